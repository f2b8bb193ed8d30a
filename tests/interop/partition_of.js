// Prints, for each key read from stdin (one UTF-8 string per line), the partition that
// kafkajs 2.x's default partitioner (Partitioners.DefaultPartitioner, murmur2) picks for a
// keyed message with no explicit partition. With --legacy it uses
// Partitioners.LegacyPartitioner (kafkajs 1.x's default) instead, which is not
// Java-compatible.
//
// Usage: node partition_of.js NUM_PARTITIONS [--legacy] < keys.txt > partitions.txt
'use strict'

const { Partitioners } = require('kafkajs')

const numPartitions = Number.parseInt(process.argv[2], 10)
if (!Number.isInteger(numPartitions) || numPartitions < 1) {
  process.stderr.write('usage: node partition_of.js NUM_PARTITIONS [--legacy] < keys\n')
  process.exit(2)
}
const factory = process.argv.includes('--legacy')
  ? Partitioners.LegacyPartitioner
  : Partitioners.DefaultPartitioner
const partitioner = factory()
const partitionMetadata = Array.from({ length: numPartitions }, (_, partitionId) => ({
  partitionErrorCode: 0,
  partitionId,
  leader: 1,
  replicas: [1],
  isr: [1],
}))

const chunks = []
process.stdin.on('data', (chunk) => chunks.push(chunk))
process.stdin.on('end', () => {
  const keys = Buffer.concat(chunks).toString('utf8').split('\n').filter((k) => k.length > 0)
  const lines = keys.map((key) =>
    partitioner({ topic: 'interop', partitionMetadata, message: { key, value: null } })
  )
  process.stdout.write(lines.join('\n') + '\n')
})
