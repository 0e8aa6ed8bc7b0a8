// bench_rdns: answer Haraka's lookup_rdns hook without DNS.
//
// Without a plugin on this hook, Haraka's core calls dns.reverse() on the
// client's address for every connection, a PTR query to the name server of
// /etc/resolv.conf. Every benchmark client is 127.0.0.1, so the answer is
// fixed.
'use strict'

exports.hook_lookup_rdns = function (next) {
    next(OK, 'localhost')
}
