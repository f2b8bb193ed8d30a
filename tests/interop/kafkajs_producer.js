// Reproduces a Node.js service of the field report that writes with kafkajs 2.x and its
// DefaultPartitioner (murmur2, Java-compatible), but with its own field names: each event
// goes out with the ALIAS names of design §2, {"eventId", "entityType", "entityId",
// "status", "seq" | "sequence", "ts"}, and carries a sequence. The message key is spr's
// partition key, sha256("entityType:entityId")[:8] as hex, by default (so the event lands
// where spr would put it: a well-routed producer with a foreign schema); with
// --key routing it is the plain "entityType:entityId" string instead (murmur2 of the
// wrong key, so misrouted). The producer is idempotent (acks=-1, one request in flight),
// so each partition gets the events in input order. Events come as JSON lines with the
// canonical names {"event_id", "entity_type", "entity_id", "sequence", "state",
// "timestamp"} (a missing field is left out of the output; any other field is passed
// through), or are generated from a seed. The sequence goes under "seq" and "sequence"
// alternately, unless --sequence-field picks one. For every message it prints, in input
// order, one JSON line {"index", "partition", "offset", "key", "value"} with the
// partition and offset the broker assigned. Install and run (from tests/interop/):
//
//   npm ci
//   node kafkajs_producer.js --bootstrap 127.0.0.1:9092 --topic src --events events.jsonl
//   node kafkajs_producer.js --topic src --count 1000 --entities 50 --seed 7 [--key routing]
//
// Logs go to stderr; exit status 0 only when every message was acknowledged.
'use strict'

const crypto = require('node:crypto')
const fs = require('node:fs')
const { parseArgs } = require('node:util')
const { Kafka, Partitioners, logLevel } = require('kafkajs')

const USAGE =
  'usage: node kafkajs_producer.js --topic T (--events FILE|- | --count N [--entities K] [--seed S])\n' +
  '  [--bootstrap HOST:PORT] [--key partition|routing] [--sequence-field alternate|seq|sequence]\n' +
  '  [--chunk N] [--timeout-ms MS]\n'

function fail(message) {
  process.stderr.write(`kafkajs_producer: ${message}\n`)
  process.exit(1)
}

function options() {
  let parsed
  try {
    parsed = parseArgs({
      options: {
        bootstrap: { type: 'string', default: '127.0.0.1:9092' },
        topic: { type: 'string' },
        events: { type: 'string' },
        count: { type: 'string' },
        entities: { type: 'string', default: '10' },
        seed: { type: 'string', default: '1' },
        key: { type: 'string', default: 'partition' },
        'sequence-field': { type: 'string', default: 'alternate' },
        chunk: { type: 'string', default: '500' },
        'timeout-ms': { type: 'string', default: '60000' },
      },
    }).values
  } catch (error) {
    process.stderr.write(USAGE)
    fail(error.message)
  }
  const count = parsed.count === undefined ? 0 : Number.parseInt(parsed.count, 10)
  if (!parsed.topic || (parsed.events === undefined) === (count === 0)) {
    process.stderr.write(USAGE)
    fail('need --topic and exactly one of --events or --count')
  }
  if (!['partition', 'routing'].includes(parsed.key)) fail(`unknown --key ${parsed.key}`)
  if (!['alternate', 'seq', 'sequence'].includes(parsed['sequence-field'])) {
    fail(`unknown --sequence-field ${parsed['sequence-field']}`)
  }
  return {
    brokers: parsed.bootstrap.split(','),
    topic: parsed.topic,
    events: parsed.events,
    count,
    entities: Math.max(1, Number.parseInt(parsed.entities, 10)),
    seed: Number.parseInt(parsed.seed, 10) >>> 0,
    key: parsed.key,
    sequenceField: parsed['sequence-field'],
    chunk: Math.max(1, Number.parseInt(parsed.chunk, 10)),
    timeoutMs: Number.parseInt(parsed['timeout-ms'], 10),
  }
}

// mulberry32: a tiny seeded generator, so that --seed gives the same events everywhere.
function generator(seed) {
  let state = seed
  return () => {
    state = (state + 0x6d2b79f5) >>> 0
    let t = state
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

function generate(count, entities, seed) {
  const random = generator(seed)
  const states = ['created', 'picked', 'packed', 'shipped', 'delivered', 'returned']
  const sequences = new Map()
  const events = []
  for (let i = 0; i < count; i++) {
    const entityId = `js-${Math.floor(random() * entities)}`
    const sequence = (sequences.get(entityId) ?? 0) + 1
    sequences.set(entityId, sequence)
    events.push({
      event_id: `js-${seed}-${i}`,
      entity_type: 'shipment',
      entity_id: entityId,
      sequence,
      state: states[Math.floor(random() * states.length)],
      timestamp: 1_700_000_000_000 + i,
    })
  }
  return events
}

function readEvents(path) {
  const text = fs.readFileSync(path === '-' ? 0 : path, 'utf8')
  return text
    .split('\n')
    .map((line, number) => [line.trim(), number + 1])
    .filter(([line]) => line.length > 0)
    .map(([line, number]) => {
      try {
        return JSON.parse(line)
      } catch (error) {
        return fail(`${path} line ${number}: ${error.message}`)
      }
    })
}

const ALIASES = {
  event_id: 'eventId',
  entity_type: 'entityType',
  entity_id: 'entityId',
  state: 'status',
  timestamp: 'ts',
}

// The event under this service's own names; the key order is fixed, so the bytes are
// reproducible.
function aliased(event, index, sequenceField) {
  const out = {}
  for (const [name, value] of Object.entries(event)) {
    if (name === 'sequence') {
      const field =
        sequenceField === 'alternate' ? (index % 2 === 0 ? 'seq' : 'sequence') : sequenceField
      out[field] = value
    } else {
      out[ALIASES[name] ?? name] = value
    }
  }
  return out
}

function messageKey(event, keyKind) {
  const routingKey = `${event.entity_type ?? ''}:${event.entity_id ?? ''}`
  if (keyKind === 'routing') return routingKey
  return crypto.createHash('sha256').update(routingKey, 'utf8').digest().subarray(0, 8).toString('hex')
}

async function main() {
  const opts = options()
  const events = opts.count > 0 ? generate(opts.count, opts.entities, opts.seed) : readEvents(opts.events)
  const timer = setTimeout(
    () => fail(`not every message was acknowledged within ${opts.timeoutMs} ms`),
    opts.timeoutMs
  )

  // Which partition DefaultPartitioner chose for each message object: the offsets in a
  // produce response are per partition, so this is what ties them back to messages.
  const chosen = new WeakMap()
  const createPartitioner = (...args) => {
    const partitioner = Partitioners.DefaultPartitioner(...args)
    return (request) => {
      const partition = partitioner(request)
      chosen.set(request.message, partition)
      return partition
    }
  }
  const kafka = new Kafka({
    clientId: 'spr-interop-kafkajs',
    brokers: opts.brokers,
    logLevel: logLevel.WARN,
    logCreator: () => ({ namespace, level, label, log }) => {
      const { message, ...extra } = log
      process.stderr.write(`kafkajs ${label} ${namespace}: ${message} ${JSON.stringify(extra)}\n`)
    },
  })
  const producer = kafka.producer({ idempotent: true, maxInFlightRequests: 1, createPartitioner })
  await producer.connect()
  const out = []
  try {
    for (let start = 0; start < events.length; start += opts.chunk) {
      const messages = events.slice(start, start + opts.chunk).map((event, i) => ({
        key: messageKey(event, opts.key),
        value: JSON.stringify(aliased(event, start + i, opts.sequenceField)),
      }))
      const metadata = await producer.send({ topic: opts.topic, acks: -1, messages })
      const nextOffset = new Map()
      for (const { partition, errorCode, baseOffset } of metadata) {
        if (errorCode !== 0) fail(`partition ${partition} answered error ${errorCode}`)
        nextOffset.set(partition, BigInt(baseOffset))
      }
      messages.forEach((message, i) => {
        const partition = chosen.get(message)
        if (!nextOffset.has(partition)) fail(`no produce response for partition ${partition}`)
        const offset = nextOffset.get(partition)
        nextOffset.set(partition, offset + 1n)
        out.push(
          JSON.stringify({
            index: start + i,
            partition,
            offset: Number(offset),
            key: message.key,
            value: message.value,
          })
        )
      })
    }
  } finally {
    await producer.disconnect()
  }
  clearTimeout(timer)
  process.stdout.write(out.length > 0 ? out.join('\n') + '\n' : '')
}

main().catch((error) => fail(error.stack || String(error)))
