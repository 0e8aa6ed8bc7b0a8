// nodemailer's smtp-server as a discarding sink, for Bonzo's benchmark.
//
//     node bench/servers/smtp_server_sink.js --port 2525 [--host 127.0.0.1] [--size BYTES]
//
// smtp-server is a library: this is the smallest application of it that takes
// mail. No AUTH and no STARTTLS (both disabled, AUTH optional), no reverse DNS
// lookup of the client, every sender and recipient accepted (no onMailFrom /
// onRcptTo), and an onData that reads the message stream to its end, drops
// the data and answers 250. The package comes from bench/node_modules,
// installed by bench/install.sh from bench/package-lock.json.
'use strict'

const { SMTPServer } = require('smtp-server')

function parseArgs(argv) {
    const args = { host: '127.0.0.1', port: 0, size: 200 * 1024 * 1024, backlog: 1024 }
    for (let i = 0; i < argv.length; i += 2) {
        const name = argv[i].replace(/^--/, '')
        if (!(name in args) || i + 1 >= argv.length) {
            throw new Error(`usage: smtp_server_sink.js --port N [--host H] [--size BYTES] [--backlog N]`)
        }
        args[name] = name === 'host' ? argv[i + 1] : Number(argv[i + 1])
    }
    if (!args.port) throw new Error('--port is required')
    return args
}

const args = parseArgs(process.argv.slice(2))

const server = new SMTPServer({
    name: 'smtp-server-sink.localhost', // the greeting's name, instead of os.hostname()
    banner: 'smtp-server sink',
    authOptional: true,
    disabledCommands: ['AUTH', 'STARTTLS'],
    disableReverseLookup: true, // no dns.reverse() per connection
    size: args.size, // advertised in EHLO; a bigger message is flagged, not refused
    maxClients: 100000, // default: unlimited; explicit, for the 2,000 idle connections
    logger: false,
    onData(stream, session, callback) {
        stream.on('data', () => {}) // drain: discard every chunk
        stream.on('end', () => {
            if (stream.sizeExceeded) {
                const err = new Error('Message exceeds the size limit')
                err.responseCode = 552
                return callback(err)
            }
            callback(null, 'OK')
        })
    },
})

server.on('error', (err) => {
    console.error(`smtp_server_sink: ${err.stack || err}`)
})

server.listen({ port: args.port, host: args.host, backlog: args.backlog }, () => {
    console.log(`smtp_server_sink listening on ${args.host}:${args.port}`)
})

// Stopped by the harness with SIGTERM: exit at once (server.close() would wait
// up to closeTimeout for the clients to leave).
for (const sig of ['SIGTERM', 'SIGINT']) {
    process.on(sig, () => process.exit(0))
}
