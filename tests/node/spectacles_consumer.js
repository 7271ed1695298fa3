// A real @spectacles/brokers AMQP consumer, as a Spectacles bot would run it.
// Usage: node spectacles_consumer.js AMQP_HOST_PART GROUP EVENT [EVENT...]
//   AMQP_HOST_PART is what the broker's connect() takes: it prefixes "amqp://" itself.
// Prints {"ready":true} once subscribed, then one JSON line per message:
//   {"event": EVENT, "type": typeof data, "data": data}
// where `data` is exactly what the broker hands to `broker.on(EVENT, (data, {ack}) => ...)`.
// Exits when stdin closes, so the test that spawned it never leaves it behind.
'use strict';
const { Amqp } = require('@spectacles/brokers');

async function main() {
  const [url, group, ...events] = process.argv.slice(2);
  if (!url || !group || events.length === 0) {
    console.error('usage: node spectacles_consumer.js AMQP_HOST_PART GROUP EVENT [EVENT...]');
    process.exit(2);
  }
  const broker = new Amqp(group, { reconnectTimeout: 1000 });
  broker.on('error', (err) => console.error('broker error:', err));
  for (const event of events) {
    broker.on(event, (data, { ack }) => {
      process.stdout.write(JSON.stringify({ event, type: typeof data, data }) + '\n');
      ack();
    });
  }
  const connection = await broker.connect(url);
  await broker.subscribe(events);
  process.stdout.write(JSON.stringify({ ready: true }) + '\n');
  process.stdin.on('end', async () => {
    try {
      await connection.close();
    } finally {
      process.exit(0);
    }
  });
  process.stdin.resume();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
