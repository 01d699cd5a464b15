/* dnsproxy._udpio: batched UDP reads and writes for the listeners (Linux), and the two
 * byte-copying steps of a cache hit (splice, aged_prepare).
 *
 * Python's socket module reads and writes one datagram per system call and builds a
 * new address tuple for every datagram read; on a cache hit those two calls and their
 * wrappers are most of what a query costs. This module reads up to BATCH_MAX datagrams
 * with one recvmmsg(2) and writes a batch of replies with one sendmmsg(2), without
 * raising for an empty socket, and reuses the address tuple of a recent client.
 *
 * Built only in the compiled build (setup.py, DNSPROXY_MYPYC=1), next to the
 * mypyc-compiled modules; without it dnsproxy.server reads with socket.recvfrom (the
 * pure-Python build). The functions never block (MSG_DONTWAIT) and keep the GIL: they
 * return as soon as the kernel has nothing more, and the process is single-threaded on
 * these sockets. They take exact types only (bytes, str, int, tuple, list), so no Python
 * code runs while a batch's static buffers are in use; a nested call (from a finalizer
 * run by a garbage collection, say) is refused with RuntimeError.
 *
 *   recv_batch(fd, count) -> list[tuple[bytes, address]]
 *       Up to count (at most BATCH_MAX) datagrams, each cut at SIZE_MAX_ bytes as
 *       recvfrom(SIZE_MAX_) would; [] when the socket is empty. address is what the
 *       socket module gives: (host, port) for IPv4, (host, port, flowinfo, scope_id) for
 *       IPv6; None for a datagram with no address. Raises OSError for any other error
 *       before the first datagram (an ICMP error queued for an earlier reply, say).
 *   send_batch(fd, replies, addresses) -> None | tuple[int, int]
 *       Sends replies[i] (bytes) to addresses[i]. None when every one was sent, else
 *       (buffer_full, failed): how many were not sent because the send buffer was full
 *       (EAGAIN, ENOBUFS) and for any other error, an address it cannot send to
 *       included; the others are still sent. TypeError, and nothing sent, when the
 *       lists are not lists of bytes.
 *   send_to(fd, reply, address) -> int
 *       One reply: 0 when sent, else the errno.
 *   splice(query, head, qend, tail) -> bytes
 *       query[:2] + head + query[12:qend] + tail, in one allocation.
 *   aged_prepare(body, offsets, ttls, age, qend, plain_opt, do_opt) -> tuple
 *       dnsproxy.wire.prepare(dnsproxy.wire.aged(...)) in one pass: a stored reply cut
 *       for splicing, its TTLs lowered by age.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH_MAX 64
#define SIZE_MAX_ 4096
/* Address tuples kept for reuse: a direct-mapped table, so bounded whatever the clients. */
#define ADDR_CACHE 256

typedef union {
    struct sockaddr sa;
    struct sockaddr_in in4;
    struct sockaddr_in6 in6;
} sockaddr_any;

typedef struct {
    sockaddr_any addr;
    PyObject *tuple; /* NULL while the slot is empty */
} addr_slot;

static struct mmsghdr rmsgs[BATCH_MAX];
static struct iovec riov[BATCH_MAX];
static sockaddr_any raddrs[BATCH_MAX];
static socklen_t namelens[BATCH_MAX];
static char rbufs[BATCH_MAX][SIZE_MAX_];
static struct mmsghdr smsgs[BATCH_MAX];
static struct iovec siov[BATCH_MAX];
static sockaddr_any saddrs[BATCH_MAX];
static addr_slot addr_cache[ADDR_CACHE];

typedef struct {
    PyObject *tuple; /* NULL while the slot is empty */
    sockaddr_any addr;
    socklen_t len;
} sent_slot;

static sent_slot sent_cache[ADDR_CACHE];
/* Set while recv_batch or send_batch uses the buffers above (see there). */
static int busy;

/* Whether two addresses read from a socket are the same client. */
static int
same_addr(const sockaddr_any *a, const sockaddr_any *b)
{
    if (a->sa.sa_family != b->sa.sa_family)
        return 0;
    if (a->sa.sa_family == AF_INET)
        return a->in4.sin_port == b->in4.sin_port &&
               a->in4.sin_addr.s_addr == b->in4.sin_addr.s_addr;
    return a->in6.sin6_port == b->in6.sin6_port &&
           a->in6.sin6_flowinfo == b->in6.sin6_flowinfo &&
           a->in6.sin6_scope_id == b->in6.sin6_scope_id &&
           memcmp(&a->in6.sin6_addr, &b->in6.sin6_addr, sizeof(struct in6_addr)) == 0;
}

static unsigned
addr_hash(const sockaddr_any *a)
{
    uint32_t h;
    if (a->sa.sa_family == AF_INET) {
        h = a->in4.sin_addr.s_addr ^ ((uint32_t)a->in4.sin_port << 16);
    } else {
        uint32_t w[4];
        memcpy(w, &a->in6.sin6_addr, sizeof(w));
        h = w[0] ^ w[1] ^ w[2] ^ w[3] ^ ((uint32_t)a->in6.sin6_port << 16);
    }
    h *= 2654435761u; /* Knuth's multiplicative hash: the top bits mix all of h */
    return (h >> 24) % ADDR_CACHE;
}

/* The socket module's tuple for an address (a new reference), or NULL with an exception. */
static PyObject *
make_addr(const sockaddr_any *a)
{
    char host[INET6_ADDRSTRLEN];
    if (a->sa.sa_family == AF_INET) {
        if (!inet_ntop(AF_INET, &a->in4.sin_addr, host, sizeof(host)))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", host, (int)ntohs(a->in4.sin_port));
    }
    if (a->sa.sa_family == AF_INET6) {
        if (!inet_ntop(AF_INET6, &a->in6.sin6_addr, host, sizeof(host)))
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", host, (int)ntohs(a->in6.sin6_port),
                             (unsigned int)ntohl(a->in6.sin6_flowinfo),
                             (unsigned int)a->in6.sin6_scope_id);
    }
    PyErr_Format(PyExc_OSError, "unexpected address family %d", a->sa.sa_family);
    return NULL;
}

/* The tuple for an address read from a socket (namelen bytes of it): a recent
 * client's, or a new one; None when the datagram came with no address. */
static PyObject *
cached_addr(const sockaddr_any *a, socklen_t namelen)
{
    addr_slot *slot;
    PyObject *tuple;
    if (namelen == 0)
        Py_RETURN_NONE;
    if (!(a->sa.sa_family == AF_INET && namelen >= sizeof(struct sockaddr_in)) &&
        !(a->sa.sa_family == AF_INET6 && namelen >= sizeof(struct sockaddr_in6))) {
        PyErr_Format(PyExc_OSError, "unexpected address (family %d, %u bytes)",
                     namelen >= sizeof(sa_family_t) ? a->sa.sa_family : -1, (unsigned)namelen);
        return NULL;
    }
    slot = &addr_cache[addr_hash(a)];
    if (slot->tuple != NULL && same_addr(&slot->addr, a)) {
        Py_INCREF(slot->tuple);
        return slot->tuple;
    }
    tuple = make_addr(a);
    if (tuple == NULL)
        return NULL;
    Py_XSETREF(slot->tuple, Py_NewRef(tuple));
    slot->addr = *a;
    return tuple;
}

/* Fills *out from an address as the socket module takes it: (host, port) or
 * (host, port, flowinfo, scope_id), host a numeric IPv4 or IPv6 address. */
static int
parse_addr_slow(PyObject *addr, sockaddr_any *out, socklen_t *len)
{
    Py_ssize_t n, size;
    const char *host;
    long port;
    /* Exact types only: converting a subclass could run Python code (__index__, say)
     * while the batch's buffers are being set up. */
    if (!PyTuple_CheckExact(addr) || (n = PyTuple_GET_SIZE(addr)) < 2 || n > 4 ||
        !PyUnicode_CheckExact(PyTuple_GET_ITEM(addr, 0))) {
        PyErr_SetString(PyExc_TypeError, "address must be (host, port[, flowinfo, scope_id])");
        return -1;
    }
    for (Py_ssize_t k = 1; k < n; k++) {
        if (!PyLong_CheckExact(PyTuple_GET_ITEM(addr, k))) {
            PyErr_SetString(PyExc_TypeError, "port, flowinfo and scope_id must be int");
            return -1;
        }
    }
    host = PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(addr, 0), &size);
    if (host == NULL)
        return -1;
    if ((size_t)size != strlen(host)) {
        PyErr_SetString(PyExc_ValueError, "host contains a NUL character");
        return -1;
    }
    port = PyLong_AsLong(PyTuple_GET_ITEM(addr, 1));
    if (port == -1 && PyErr_Occurred())
        return -1;
    if (port < 0 || port > 65535) {
        PyErr_SetString(PyExc_OverflowError, "port must be 0-65535");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    if (n == 2 && inet_pton(AF_INET, host, &out->in4.sin_addr) == 1) {
        out->in4.sin_family = AF_INET;
        out->in4.sin_port = htons((uint16_t)port);
        *len = sizeof(struct sockaddr_in);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &out->in6.sin6_addr) == 1) {
        out->in6.sin6_family = AF_INET6;
        out->in6.sin6_port = htons((uint16_t)port);
        if (n > 2) {
            unsigned long flowinfo = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 2));
            if (flowinfo == (unsigned long)-1 && PyErr_Occurred())
                return -1;
            if (flowinfo > 0xfffff) {
                PyErr_SetString(PyExc_OverflowError, "flowinfo must be 0-1048575");
                return -1;
            }
            out->in6.sin6_flowinfo = htonl((uint32_t)flowinfo);
        }
        if (n > 3) {
            unsigned long scope = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(addr, 3));
            if (scope == (unsigned long)-1 && PyErr_Occurred())
                return -1;
            if (scope > 0xffffffffUL) {
                PyErr_SetString(PyExc_OverflowError, "scope_id must fit in 32 bits");
                return -1;
            }
            out->in6.sin6_scope_id = (uint32_t)scope;
        }
        *len = sizeof(struct sockaddr_in6);
        return 0;
    }
    PyErr_Format(PyExc_ValueError, "not a numeric IP address: %R", PyTuple_GET_ITEM(addr, 0));
    return -1;
}

/* The address of a tuple sent to lately, by the tuple's identity: replies go to the
 * tuples recv_batch made, so most sends skip parsing (about 350 instructions). Each slot
 * holds a reference, so no other object can take a cached tuple's memory while it is
 * there. */
static int
parse_addr(PyObject *addr, sockaddr_any *out, socklen_t *len)
{
    sent_slot *slot = &sent_cache[((uintptr_t)addr >> 4) % ADDR_CACHE];
    if (slot->tuple == addr) {
        *out = slot->addr;
        *len = slot->len;
        return 0;
    }
    if (parse_addr_slow(addr, out, len) < 0)
        return -1;
    /* addr is an exact tuple of exact str and ints: dropping the old one runs no Python. */
    Py_XSETREF(slot->tuple, Py_NewRef(addr));
    slot->addr = *out;
    slot->len = *len;
    return 0;
}

static int
arg_int(PyObject *obj, const char *what, long lo, long hi, long *out)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be %ld-%ld, not %ld", what, lo, hi, v);
        return -1;
    }
    *out = v;
    return 0;
}

static PyObject *
recv_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long fd, count;
    int got, i;
    PyObject *list;
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "recv_batch(fd, count)");
        return NULL;
    }
    if (arg_int(args[0], "fd", 0, INT_MAX, &fd) < 0 ||
        arg_int(args[1], "count", 1, BATCH_MAX, &count) < 0)
        return NULL;
    /* Making the result's objects can run a garbage collection, and so finalizers:
     * one that read a socket here would overwrite the buffers being read. */
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "recv_batch re-entered");
        return NULL;
    }
    /* The headers point at their buffers from module init on; the kernel changes only
     * msg_namelen (set back below), msg_flags and msg_len of the messages it fills. */
    do {
        got = recvmmsg((int)fd, rmsgs, (unsigned int)count, MSG_DONTWAIT, NULL);
    } while (got < 0 && errno == EINTR);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    busy = 1;
    for (i = 0; i < got; i++) {
        namelens[i] = rmsgs[i].msg_hdr.msg_namelen;
        rmsgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_any);
    }
    list = PyList_New(got);
    if (list == NULL) {
        busy = 0;
        return NULL;
    }
    for (i = 0; i < got; i++) {
        unsigned int len = rmsgs[i].msg_len < SIZE_MAX_ ? rmsgs[i].msg_len : SIZE_MAX_;
        PyObject *data, *addr, *pair;
        data = PyBytes_FromStringAndSize(rbufs[i], (Py_ssize_t)len);
        if (data == NULL)
            goto fail;
        addr = cached_addr(&raddrs[i], namelens[i]);
        if (addr == NULL) {
            Py_DECREF(data);
            goto fail;
        }
        pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(data);
            Py_DECREF(addr);
            goto fail;
        }
        PyTuple_SET_ITEM(pair, 0, data);
        PyTuple_SET_ITEM(pair, 1, addr);
        PyList_SET_ITEM(list, i, pair);
    }
    busy = 0;
    return list;
fail:
    busy = 0;
    /* Items not set yet are NULL, which list deallocation skips. */
    Py_DECREF(list);
    return NULL;
}

/* Sends messages [0, n) of smsgs, skipping one that fails; counts what was not sent. */
static void
send_prepared(int fd, int n, long *full, long *failed)
{
    int done = 0, sent;
    while (done < n) {
        sent = sendmmsg(fd, smsgs + done, (unsigned int)(n - done), MSG_DONTWAIT);
        if (sent > 0) {
            done += sent;
            continue;
        }
        if (sent < 0 && errno == EINTR)
            continue;
        if (sent < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS))
            (*full)++;
        else
            (*failed)++;
        done++;
    }
}

/* Sets up message i of smsgs for reply (exact bytes) to addr; -1 with an exception when
 * addr is not an address this module sends to. */
static int
prepare(int i, PyObject *reply, PyObject *addr)
{
    if (parse_addr(addr, &saddrs[i], &smsgs[i].msg_hdr.msg_namelen) < 0)
        return -1;
    siov[i].iov_base = PyBytes_AS_STRING(reply);
    siov[i].iov_len = (size_t)PyBytes_GET_SIZE(reply);
    smsgs[i].msg_hdr.msg_name = &saddrs[i];
    smsgs[i].msg_hdr.msg_iov = &siov[i];
    smsgs[i].msg_hdr.msg_iovlen = 1;
    smsgs[i].msg_hdr.msg_control = NULL;
    smsgs[i].msg_hdr.msg_controllen = 0;
    smsgs[i].msg_hdr.msg_flags = 0;
    return 0;
}

static PyObject *
send_batch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long fd, full = 0, failed = 0;
    Py_ssize_t n, i;
    int prepared = 0;
    PyObject *replies, *addrs;
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send_batch(fd, replies, addresses)");
        return NULL;
    }
    if (arg_int(args[0], "fd", 0, INT_MAX, &fd) < 0)
        return NULL;
    replies = args[1];
    addrs = args[2];
    if (!PyList_CheckExact(replies) || !PyList_CheckExact(addrs)) {
        PyErr_SetString(PyExc_TypeError, "replies and addresses must be lists");
        return NULL;
    }
    n = PyList_GET_SIZE(replies);
    if (PyList_GET_SIZE(addrs) != n) {
        PyErr_SetString(PyExc_ValueError, "as many addresses as replies");
        return NULL;
    }
    for (i = 0; i < n; i++) {
        if (!PyBytes_CheckExact(PyList_GET_ITEM(replies, i))) {
            PyErr_SetString(PyExc_TypeError, "replies must be bytes");
            return NULL;
        }
    }
    if (busy) {
        PyErr_SetString(PyExc_RuntimeError, "send_batch re-entered");
        return NULL;
    }
    busy = 1;
    /* From here on no Python code runs (exact types only), so the lists and their items
     * stay as they are while smsgs points into them. In chunks of BATCH_MAX; an address
     * that cannot be sent to is counted as failed, as the send would be. */
    for (i = 0; i < n; i++) {
        if (prepare(prepared, PyList_GET_ITEM(replies, i), PyList_GET_ITEM(addrs, i)) < 0) {
            PyErr_Clear();
            failed++;
        } else if (++prepared == BATCH_MAX) {
            send_prepared((int)fd, prepared, &full, &failed);
            prepared = 0;
        }
    }
    if (prepared)
        send_prepared((int)fd, prepared, &full, &failed);
    busy = 0;
    if (full == 0 && failed == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(ll)", full, failed);
}

static PyObject *
send_to(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    long fd;
    char *buf;
    Py_ssize_t len;
    sockaddr_any to;
    socklen_t tolen;
    ssize_t sent;
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send_to(fd, reply, address)");
        return NULL;
    }
    if (arg_int(args[0], "fd", 0, INT_MAX, &fd) < 0 || parse_addr(args[2], &to, &tolen) < 0)
        return NULL;
    if (!PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "reply must be bytes");
        return NULL;
    }
    buf = PyBytes_AS_STRING(args[1]);
    len = PyBytes_GET_SIZE(args[1]);
    do {
        sent = sendto((int)fd, buf, (size_t)len, MSG_DONTWAIT, &to.sa, tolen);
    } while (sent < 0 && errno == EINTR);
    return PyLong_FromLong(sent < 0 ? errno : 0);
}

static PyObject *
splice(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *query, *head, *tail, *out;
    Py_ssize_t qend, qlen, hlen, tlen;
    char *p;
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "splice(query, head, qend, tail)");
        return NULL;
    }
    query = args[0];
    head = args[1];
    tail = args[3];
    if (!PyBytes_CheckExact(query) || !PyBytes_CheckExact(head) || !PyBytes_CheckExact(tail)) {
        PyErr_SetString(PyExc_TypeError, "query, head and tail must be bytes");
        return NULL;
    }
    qend = PyLong_AsSsize_t(args[2]);
    if (qend == -1 && PyErr_Occurred())
        return NULL;
    qlen = PyBytes_GET_SIZE(query);
    if (qend < 12 || qend > qlen) {
        PyErr_SetString(PyExc_ValueError, "qend must be within the query, after its header");
        return NULL;
    }
    hlen = PyBytes_GET_SIZE(head);
    tlen = PyBytes_GET_SIZE(tail);
    out = PyBytes_FromStringAndSize(NULL, 2 + hlen + (qend - 12) + tlen);
    if (out == NULL)
        return NULL;
    p = PyBytes_AS_STRING(out);
    memcpy(p, PyBytes_AS_STRING(query), 2);
    memcpy(p + 2, PyBytes_AS_STRING(head), (size_t)hlen);
    memcpy(p + 2 + hlen, PyBytes_AS_STRING(query) + 12, (size_t)(qend - 12));
    memcpy(p + 2 + hlen + (qend - 12), PyBytes_AS_STRING(tail), (size_t)tlen);
    return out;
}

/* A new bytes of a + b. */
static PyObject *
concat(const char *a, Py_ssize_t alen, PyObject *b)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, alen + PyBytes_GET_SIZE(b));
    if (out == NULL)
        return NULL;
    memcpy(PyBytes_AS_STRING(out), a, (size_t)alen);
    memcpy(PyBytes_AS_STRING(out) + alen, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
    return out;
}

static PyObject *
aged_prepare(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *body, *offsets, *ttls, *plain, *dobit, *head = NULL, *head_opt = NULL;
    PyObject *tail = NULL, *tail_plain = NULL, *tail_do = NULL, *result;
    Py_ssize_t blen, qend, n, i;
    long age;
    unsigned char *t;
    unsigned arcount;
    (void)module;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "aged_prepare(body, offsets, ttls, age, qend, plain_opt, do_opt)");
        return NULL;
    }
    body = args[0];
    offsets = args[1];
    ttls = args[2];
    plain = args[5];
    dobit = args[6];
    if (!PyBytes_CheckExact(body) || !PyBytes_CheckExact(plain) || !PyBytes_CheckExact(dobit) ||
        !PyTuple_CheckExact(offsets) || !PyTuple_CheckExact(ttls) ||
        !PyLong_CheckExact(args[3]) || !PyLong_CheckExact(args[4])) {
        PyErr_SetString(PyExc_TypeError, "aged_prepare: bytes, tuple, tuple, int, int, bytes, bytes");
        return NULL;
    }
    age = PyLong_AsLong(args[3]);
    qend = PyLong_AsSsize_t(args[4]);
    if ((age == -1 || qend == -1) && PyErr_Occurred())
        return NULL;
    blen = PyBytes_GET_SIZE(body);
    n = PyTuple_GET_SIZE(offsets);
    if (qend < 12 || blen < 12 || PyTuple_GET_SIZE(ttls) != n) {
        PyErr_SetString(PyExc_ValueError, "aged_prepare: qend or TTL offsets do not fit the reply");
        return NULL;
    }
    head = PyBytes_FromStringAndSize(PyBytes_AS_STRING(body) + 2, 10);
    if (head == NULL)
        goto fail;
    /* body[qend:], empty when qend is past the end (as Python slices). */
    tail = PyBytes_FromStringAndSize(PyBytes_AS_STRING(body) + (qend < blen ? qend : blen),
                                     qend < blen ? blen - qend : 0);
    if (tail == NULL)
        goto fail;
    if (age > 0) {
        /* As wire.aged on the whole body, then cut: a TTL field lands in the tail (where
         * every record's is) or in the header octets the head keeps. */
        unsigned char *h = (unsigned char *)PyBytes_AS_STRING(head);
        t = (unsigned char *)PyBytes_AS_STRING(tail);
        for (i = 0; i < n; i++) {
            PyObject *o = PyTuple_GET_ITEM(offsets, i), *v = PyTuple_GET_ITEM(ttls, i);
            Py_ssize_t off, p;
            long ttl;
            int k;
            if (!PyLong_CheckExact(o) || !PyLong_CheckExact(v)) {
                PyErr_SetString(PyExc_TypeError, "aged_prepare: offsets and TTLs are ints");
                goto fail;
            }
            off = PyLong_AsSsize_t(o);
            ttl = PyLong_AsLong(v);
            if ((off == -1 || ttl == -1) && PyErr_Occurred())
                goto fail;
            if (off < 0 || off > blen - 4) {
                PyErr_SetString(PyExc_ValueError, "aged_prepare: a TTL offset outside the reply");
                goto fail;
            }
            ttl = ttl > age ? ttl - age : 0;
            for (k = 0; k < 4; k++) {
                unsigned char octet = (unsigned char)((ttl >> (24 - 8 * k)) & 0xFF);
                p = off + k;
                if (p >= qend)
                    t[p - qend] = octet;
                else if (p >= 2 && p < 12)
                    h[p - 2] = octet;
            }
        }
    }
    head_opt = PyBytes_FromStringAndSize(PyBytes_AS_STRING(head), 10);
    if (head_opt == NULL)
        goto fail;
    /* ARCOUNT (octets 10-11 of the header, 8-9 of head) counts our OPT record too. */
    t = (unsigned char *)PyBytes_AS_STRING(head_opt);
    arcount = (((unsigned)t[8] << 8) | t[9]) + 1;
    t[8] = (unsigned char)((arcount >> 8) & 0xFF);
    t[9] = (unsigned char)(arcount & 0xFF);
    tail_plain = concat(PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail), plain);
    if (tail_plain == NULL)
        goto fail;
    tail_do = concat(PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail), dobit);
    if (tail_do == NULL)
        goto fail;
    result = PyTuple_New(5);
    if (result == NULL)
        goto fail;
    PyTuple_SET_ITEM(result, 0, head); /* each reference moves into the tuple */
    PyTuple_SET_ITEM(result, 1, head_opt);
    PyTuple_SET_ITEM(result, 2, tail);
    PyTuple_SET_ITEM(result, 3, tail_plain);
    PyTuple_SET_ITEM(result, 4, tail_do);
    return result;
fail:
    Py_XDECREF(head);
    Py_XDECREF(head_opt);
    Py_XDECREF(tail);
    Py_XDECREF(tail_plain);
    Py_XDECREF(tail_do);
    return NULL;
}

static PyMethodDef methods[] = {
    {"recv_batch", (PyCFunction)(void (*)(void))recv_batch, METH_FASTCALL,
     "recv_batch(fd, count) -> list of (data, address): up to count datagrams, [] if none."},
    {"send_batch", (PyCFunction)(void (*)(void))send_batch, METH_FASTCALL,
     "send_batch(fd, replies, addresses) -> None, or (buffer_full, failed) counts."},
    {"aged_prepare", (PyCFunction)(void (*)(void))aged_prepare, METH_FASTCALL,
     "aged_prepare(body, offsets, ttls, age, qend, plain_opt, do_opt) -> the 5 parts of "
     "dnsproxy.wire.prepare(dnsproxy.wire.aged(body, offsets, ttls, age), qend, opts)."},
    {"splice", (PyCFunction)(void (*)(void))splice, METH_FASTCALL,
     "splice(query, head, qend, tail) -> query[:2] + head + query[12:qend] + tail."},
    {"send_to", (PyCFunction)(void (*)(void))send_to, METH_FASTCALL,
     "send_to(fd, reply, address) -> 0 when sent, else the errno."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "dnsproxy._udpio",
    "Batched UDP reads and writes (recvmmsg/sendmmsg) for dnsproxy's listeners.",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__udpio(void)
{
    PyObject *m;
    int i;
    for (i = 0; i < BATCH_MAX; i++) {
        riov[i].iov_base = rbufs[i];
        riov[i].iov_len = SIZE_MAX_;
        rmsgs[i].msg_hdr.msg_name = &raddrs[i];
        rmsgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_any);
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }
    m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "BATCH_MAX", BATCH_MAX) < 0 ||
        PyModule_AddIntConstant(m, "SIZE_MAX", SIZE_MAX_) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
