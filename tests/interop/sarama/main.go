// Command sarama-producer reproduces the field report's Go producer (design §1): a
// github.com/IBM/sarama producer left on sarama's DEFAULT partitioner
// (NewHashPartitioner: FNV-1a of the key bytes, then abs(int32(h) % n)), sending JSON
// events {"event_type", "entity_id", "state", "timestamp" (epoch ms)} with NO sequence,
// keyed by the plain string "entity_type:entity_id" (not spr's partition key), with the
// report's buggy header idempotency-key = "entity_type:entity_id" (no sequence). The
// producer is idempotent with acks=all, one request in flight and lz4 compression, so
// each partition receives the events in input order. It is a test tool for the
// `spr transform` integration tests: for every message it prints one JSON line on stdout
// {"index", "partition", "offset", "key", "value"} with the partition and offset the
// broker assigned, in input order, so that a test can work out the source order itself.
// Build (modules come from the Go module proxy, pinned by go.sum):
//
//	cd tests/interop/sarama && go build -mod=readonly -trimpath -o /some/dir/sarama-producer .
//
// Run, with events as JSON lines {"entity_type" (or "event_type"), "entity_id",
// "state", "timestamp"?} in a file or on stdin ("-"), or generated from a seed:
//
//	sarama-producer -bootstrap 127.0.0.1:9092 -topic src -events events.jsonl
//	sarama-producer -bootstrap 127.0.0.1:9092 -topic src -count 1000 -entities 50 -seed 7
//
// A missing "timestamp" becomes the current time; a missing "state" is sent as "" (an
// invalid event, on purpose). Exit status 0 only when every message was acknowledged.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"github.com/IBM/sarama"
)

// goEvent is the field report's Go event: no sequence, entity type under "event_type".
type goEvent struct {
	EventType string `json:"event_type"`
	EntityID  string `json:"entity_id"`
	State     string `json:"state"`
	Timestamp int64  `json:"timestamp"`
}

// inputEvent accepts the canonical entity_type as well as the report's event_type.
type inputEvent struct {
	EntityType *string `json:"entity_type"`
	EventType  *string `json:"event_type"`
	EntityID   string  `json:"entity_id"`
	State      string  `json:"state"`
	Timestamp  *int64  `json:"timestamp"`
}

type sent struct {
	Index     int    `json:"index"`
	Partition int32  `json:"partition"`
	Offset    int64  `json:"offset"`
	Key       string `json:"key"`
	Value     string `json:"value"`
}

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "sarama-producer:", err)
		os.Exit(1)
	}
}

func run() error {
	bootstrap := flag.String("bootstrap", "127.0.0.1:9092", "comma-separated bootstrap brokers")
	topic := flag.String("topic", "", "topic to write (required)")
	eventsPath := flag.String("events", "", "JSON-lines file of events, '-' for stdin")
	count := flag.Int("count", 0, "generate this many events instead of reading -events")
	entities := flag.Int("entities", 10, "distinct entities when generating")
	seed := flag.Uint64("seed", 1, "random seed when generating")
	version := flag.String("kafka-version", "4.1.0", "Kafka protocol version sarama assumes")
	compression := flag.String("compression", "lz4", "none|gzip|snappy|lz4|zstd")
	timeout := flag.Duration("timeout", 60*time.Second, "give up when the broker has not acknowledged everything by then")
	flag.Parse()
	if *topic == "" || (*eventsPath == "") == (*count == 0) {
		flag.Usage()
		return errors.New("need -topic and exactly one of -events or -count")
	}

	var events []goEvent
	var err error
	if *count > 0 {
		events = generate(*count, *entities, *seed)
	} else {
		events, err = readEvents(*eventsPath)
		if err != nil {
			return err
		}
	}

	config, err := producerConfig(*version, *compression, *timeout)
	if err != nil {
		return err
	}
	producer, err := sarama.NewSyncProducer(strings.Split(*bootstrap, ","), config)
	if err != nil {
		return fmt.Errorf("cannot start the producer: %w", err)
	}

	messages := make([]*sarama.ProducerMessage, len(events))
	for i, event := range events {
		value, err := json.Marshal(event)
		if err != nil {
			return err
		}
		key := event.EventType + ":" + event.EntityID
		messages[i] = &sarama.ProducerMessage{
			Topic: *topic,
			Key:   sarama.StringEncoder(key),
			Value: sarama.ByteEncoder(value),
			Headers: []sarama.RecordHeader{
				{Key: []byte("idempotency-key"), Value: []byte(key)},
			},
		}
	}

	done := make(chan error, 1)
	go func() { done <- producer.SendMessages(messages) }()
	select {
	case err = <-done:
	case <-time.After(*timeout):
		return fmt.Errorf("not every message was acknowledged within %s", *timeout)
	}
	closeErr := producer.Close()
	if err != nil {
		var perrs sarama.ProducerErrors
		if errors.As(err, &perrs) && len(perrs) > 0 {
			return fmt.Errorf("%d of %d messages failed, first: %w", len(perrs), len(messages), perrs[0].Err)
		}
		return err
	}
	if closeErr != nil {
		return closeErr
	}

	out := bufio.NewWriter(os.Stdout)
	encoder := json.NewEncoder(out)
	for i, message := range messages {
		key, _ := message.Key.Encode()
		value, _ := message.Value.Encode()
		if message.Offset < 0 {
			return fmt.Errorf("message %d has no offset", i)
		}
		record := sent{Index: i, Partition: message.Partition, Offset: message.Offset, Key: string(key), Value: string(value)}
		if err := encoder.Encode(record); err != nil {
			return err
		}
	}
	return out.Flush()
}

func producerConfig(version, compression string, timeout time.Duration) (*sarama.Config, error) {
	config := sarama.NewConfig()
	kafkaVersion, err := sarama.ParseKafkaVersion(version)
	if err != nil {
		return nil, err
	}
	config.Version = kafkaVersion
	config.ClientID = "spr-interop-sarama"
	// Idempotence needs acks=all and one request in flight per broker connection.
	config.Producer.Idempotent = true
	config.Producer.RequiredAcks = sarama.WaitForAll
	config.Net.MaxOpenRequests = 1
	config.Producer.Retry.Max = 10
	config.Producer.Return.Successes = true
	config.Producer.Return.Errors = true
	config.Producer.Timeout = timeout
	config.Producer.Flush.Frequency = 5 * time.Millisecond
	if err := config.Producer.Compression.UnmarshalText([]byte(compression)); err != nil {
		return nil, err
	}
	// config.Producer.Partitioner is deliberately left at sarama's default,
	// sarama.NewHashPartitioner: reproducing it is the point of this tool.
	return config, config.Validate()
}

func readEvents(path string) ([]goEvent, error) {
	var reader io.Reader = os.Stdin
	if path != "-" {
		file, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer file.Close()
		reader = file
	}
	scanner := bufio.NewScanner(reader)
	scanner.Buffer(make([]byte, 0, 64*1024), 16*1024*1024)
	now := time.Now().UnixMilli()
	var events []goEvent
	for line := 1; scanner.Scan(); line++ {
		text := strings.TrimSpace(scanner.Text())
		if text == "" {
			continue
		}
		var in inputEvent
		if err := json.Unmarshal([]byte(text), &in); err != nil {
			return nil, fmt.Errorf("%s line %d: %w", path, line, err)
		}
		event := goEvent{EntityID: in.EntityID, State: in.State, Timestamp: now}
		switch {
		case in.EventType != nil:
			event.EventType = *in.EventType
		case in.EntityType != nil:
			event.EventType = *in.EntityType
		}
		if in.Timestamp != nil {
			event.Timestamp = *in.Timestamp
		}
		events = append(events, event)
	}
	return events, scanner.Err()
}

func generate(count, entities int, seed uint64) []goEvent {
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	states := []string{"created", "authorized", "captured", "shipped", "delivered", "cancelled"}
	start := int64(1_700_000_000_000)
	events := make([]goEvent, count)
	for i := range events {
		events[i] = goEvent{
			EventType: "order",
			EntityID:  fmt.Sprintf("go-%d", rng.IntN(max(entities, 1))),
			State:     states[rng.IntN(len(states))],
			Timestamp: start + int64(i),
		}
	}
	return events
}
