// The real @spectacles/proxy client over @spectacles/brokers (AMQP), as a Spectacles bot would use it.
// Usage: node spectacles_proxy_client.js AMQP_HOST_PART GROUP TOKEN
//   AMQP_HOST_PART is what the broker's connect() takes: it prefixes "amqp://" itself.
// Makes a fixed list of calls and prints one JSON line per call:
//   {"name": NAME, "status": reply.status, "body": reply.body}
// where a status-0 body's `body` (Discord's bytes, a Buffer after MessagePack) is printed as text.
'use strict';
const { Amqp } = require('@spectacles/brokers');
const { Client } = require('@spectacles/proxy');

function printable(reply) {
  if (reply.status !== 0) return reply;
  const { status, headers, url, body } = reply.body;
  return {
    status: reply.status,
    body: { status, headers, url, bodyType: body && body.constructor.name, text: Buffer.from(body).toString('utf8') },
  };
}

async function main() {
  const [url, group, token] = process.argv.slice(2);
  if (!url || !group || !token) {
    console.error('usage: node spectacles_proxy_client.js AMQP_HOST_PART GROUP TOKEN');
    process.exit(2);
  }
  const broker = new Amqp(group);
  broker.on('error', (err) => console.error('broker error:', err));
  const connection = await broker.connect(url);
  const client = new Client(broker, token);
  const calls = [
    ['get', () => client.get('/users/@me')],
    ['post', () => client.post('/channels/1/messages', { content: 'from node' })],
    [
      'post-buffer',
      () => client.post('/channels/1/messages', Buffer.from('{"content":"buffer"}'), {
        headers: { 'content-type': 'application/json' },
      }),
    ],
    ['get-query', () => client.get('/channels/1/messages', { query: { limit: '2' } })],
    ['not-found', () => client.get('/guilds/1/audit-logs')],
    ['bad-path', () => client.get('users/@me')],
    // `make` is TypeScript-protected only; a bot can reach it, and so can a bad method.
    ['bad-method', () => client.make('FETCH', '/users/@me', undefined, {})],
  ];
  for (const [name, call] of calls) {
    try {
      const reply = await call();
      process.stdout.write(JSON.stringify({ name, ...printable(reply) }) + '\n');
    } catch (err) {
      process.stdout.write(JSON.stringify({ name, error: String(err) }) + '\n');
    }
  }
  await connection.close();
}

main().then(
  () => process.exit(0),
  (err) => {
    console.error(err);
    process.exit(1);
  },
);
