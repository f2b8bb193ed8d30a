// Prints, for each key read from stdin (one UTF-8 string per line), the partition the
// official Java producer (kafka-clients) picks for a keyed record with no explicit
// partition and no custom partitioner.
//
// Usage: java -cp kafka-clients.jar:. PartitionOf NUM_PARTITIONS < keys.txt > partitions.txt
//
// The key is serialized by StringSerializer, as a Java service producing String keys would.
// The partition comes from BuiltInPartitioner.partitionForKey, the code path KafkaProducer
// takes for keyed records since 3.3. It is cross-checked against the documented formula
// toPositive(murmur2(key)) % numPartitions so that an API change cannot go unnoticed.

import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.nio.charset.StandardCharsets;

import org.apache.kafka.clients.producer.internals.BuiltInPartitioner;
import org.apache.kafka.common.serialization.StringSerializer;
import org.apache.kafka.common.utils.Utils;

public final class PartitionOf {
    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: PartitionOf NUM_PARTITIONS < keys");
            System.exit(2);
        }
        int numPartitions = Integer.parseInt(args[0]);
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        BufferedWriter out = new BufferedWriter(new OutputStreamWriter(System.out, StandardCharsets.UTF_8));
        try (StringSerializer serializer = new StringSerializer()) {
            String key;
            while ((key = in.readLine()) != null) {
                byte[] keyBytes = serializer.serialize("interop", key);
                int partition = BuiltInPartitioner.partitionForKey(keyBytes, numPartitions);
                int formula = Utils.toPositive(Utils.murmur2(keyBytes)) % numPartitions;
                if (partition != formula) {
                    System.err.println("BuiltInPartitioner and murmur2 formula disagree on " + key);
                    System.exit(1);
                }
                out.write(Integer.toString(partition));
                out.newLine();
            }
        }
        out.flush();
    }
}
