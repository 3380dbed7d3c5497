/* netload: the benchmark's real server and load generator (compiled by bench/run.py when a C
 * compiler exists; bench/traffic.py is the slower Python stand-in with the same interface).
 *
 *   netload serve PORT NAME
 *       answer every TCP connection on PORT with "NAME\n" and close; prints "ready" once listening.
 *   netload load SECONDS CONCURRENCY SRC[,SRC...] DST:PORT[,DST:PORT...] [RATE]
 *       open short TCP connections for SECONDS, CONCURRENCY in flight, each from the next source
 *       address and to the next destination (round robin), at most RATE new ones per second when
 *       RATE is given (a paced load, for latencies at a known rate); print one JSON line:
 *       {"conns": N, "errors": E, "wall": s, "cpu": s, "replies": {"NAME": n, ...}}
 *
 * Why C: a Python generator spends more CPU per connection than the director does, which dilutes
 * the ratios the benchmark reports.  Why the abortive close (SO_LINGER 0, an RST after the reply):
 * no socket lingers in TIME_WAIT on either side, so ports never run out and every connection is a
 * new conntrack entry; conntrack keeps a closed entry only briefly.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define MAX_ADDRS 64
#define MAX_CONC 1024
#define MAX_NAMES 16
#define CONN_TIMEOUT 3.0
#define DRAIN_TIMEOUT 4.0

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static int serve(int port, const char *name) {
    char reply[256];
    int len = snprintf(reply, sizeof reply, "%s\n", name);
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 4096)) {
        perror("netload serve");
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            continue;
        if (write(c, reply, len) < 0) { /* the client may have gone: nothing to do */ }
        close(c);
    }
}

/* Split "a,b,c" into addresses; with_port parses "ip:port". */
static int parse_addrs(char *text, struct sockaddr_in *out, int with_port) {
    int n = 0;
    for (char *tok = strtok(text, ","); tok && n < MAX_ADDRS; tok = strtok(NULL, ",")) {
        memset(&out[n], 0, sizeof out[n]);
        out[n].sin_family = AF_INET;
        char *colon = with_port ? strrchr(tok, ':') : NULL;
        if (colon) {
            *colon = 0;
            out[n].sin_port = htons(atoi(colon + 1));
        }
        if (inet_pton(AF_INET, tok, &out[n].sin_addr) != 1) {
            fprintf(stderr, "netload: bad address %s\n", tok);
            exit(2);
        }
        n++;
    }
    return n;
}

struct load {
    int ep, nsrc, ndst, nnames;
    unsigned long next, conns, errors;
    struct sockaddr_in src[MAX_ADDRS], dst[MAX_ADDRS];
    int fd[MAX_CONC];
    double started[MAX_CONC];
    char names[MAX_NAMES][64];
    unsigned long counts[MAX_NAMES];
};

static void tally(struct load *l, const char *buf, ssize_t n) {
    char name[64];
    ssize_t len = 0;
    while (len < n && len < 63 && buf[len] != '\n')
        len++;
    memcpy(name, buf, len);
    name[len] = 0;
    for (int i = 0; i < l->nnames; i++)
        if (!strcmp(l->names[i], name)) {
            l->counts[i]++;
            return;
        }
    if (l->nnames < MAX_NAMES) {
        strcpy(l->names[l->nnames], name);
        l->counts[l->nnames++] = 1;
    }
}

/* Open slot's next connection: non-blocking connect, wait for the reply. */
static void open_conn(struct load *l, int slot) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    struct linger lg = {1, 0};
    struct sockaddr_in *src = &l->src[l->next % l->nsrc], *dst = &l->dst[l->next % l->ndst];
    struct epoll_event ev = {.events = EPOLLIN, .data.u32 = slot};
    l->next++;
    l->fd[slot] = -1;
    if (fd < 0) {
        l->errors++;
        return;
    }
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    if (bind(fd, (struct sockaddr *)src, sizeof *src) ||
        (connect(fd, (struct sockaddr *)dst, sizeof *dst) && errno != EINPROGRESS) ||
        epoll_ctl(l->ep, EPOLL_CTL_ADD, fd, &ev)) {
        close(fd);
        l->errors++;
        return;
    }
    l->fd[slot] = fd;
    l->started[slot] = now();
}

/* The slot's connection became readable (or failed): count it and close it. */
static void finish_conn(struct load *l, int slot, unsigned events) {
    char buf[128];
    ssize_t n = read(l->fd[slot], buf, sizeof buf);
    if (n < 0 && errno == EAGAIN && !(events & (EPOLLERR | EPOLLHUP)))
        return;
    if (n > 0) {
        l->conns++;
        tally(l, buf, n);
    } else {
        l->errors++;
    }
    close(l->fd[slot]);
    l->fd[slot] = -1;
}

/* May another connection start at time t?  Paced: not ahead of RATE per second. */
static int may_start(struct load *l, double rate, double t0, double t) {
    return rate <= 0 || (double)l->next < rate * (t - t0);
}

static int load(double secs, int conc, char *srcs, char *dsts, double rate) {
    static struct load l;
    int idle[MAX_CONC], nidle = 0;
    l.nsrc = parse_addrs(srcs, l.src, 0);
    l.ndst = parse_addrs(dsts, l.dst, 1);
    l.ep = epoll_create1(EPOLL_CLOEXEC);
    if (conc > MAX_CONC)
        conc = MAX_CONC;
    double t0 = now(), cpu0 = cpu_seconds(), deadline = t0 + secs, last_scan = t0;
    int open = 0;
    for (int i = 0; i < conc; i++) {
        if (!may_start(&l, rate, t0, now())) {
            idle[nidle++] = i;
            l.fd[i] = -1;
            continue;
        }
        open_conn(&l, i);
        open += l.fd[i] >= 0;
    }
    struct epoll_event evs[MAX_CONC];
    while (open > 0 || (nidle > 0 && now() < deadline)) {
        double t = now();
        if (t > deadline + DRAIN_TIMEOUT)
            break;
        int n = epoll_wait(l.ep, evs, conc, rate > 0 ? 1 : 100);
        for (int i = 0; i < n; i++) {
            int slot = evs[i].data.u32;
            finish_conn(&l, slot, evs[i].events);
            if (l.fd[slot] >= 0)
                continue;
            open--;
            idle[nidle++] = slot;
        }
        t = now();
        while (nidle > 0 && t < deadline && may_start(&l, rate, t0, t)) {
            int slot = idle[--nidle];
            open_conn(&l, slot);
            open += l.fd[slot] >= 0;  /* a slot whose connect failed outright is not reused */
        }
        t = now();
        if (t - last_scan > 0.5) { /* connections nobody answered: count and replace them */
            last_scan = t;
            for (int s = 0; s < conc; s++)
                if (l.fd[s] >= 0 && t - l.started[s] > CONN_TIMEOUT) {
                    close(l.fd[s]);
                    l.fd[s] = -1;
                    l.errors++;
                    open--;
                    idle[nidle++] = s;
                }
        }
    }
    for (int s = 0; s < conc; s++)
        if (l.fd[s] >= 0) {
            close(l.fd[s]);
            l.errors++;
        }
    double wall = now() - t0, cpu = cpu_seconds() - cpu0;
    printf("{\"conns\": %lu, \"errors\": %lu, \"wall\": %.6f, \"cpu\": %.6f, \"replies\": {",
           l.conns, l.errors, wall, cpu);
    for (int i = 0; i < l.nnames; i++)
        printf("%s\"%s\": %lu", i ? ", " : "", l.names[i], l.counts[i]);
    printf("}}\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "serve"))
        return serve(atoi(argv[2]), argv[3]);
    if ((argc == 6 || argc == 7) && !strcmp(argv[1], "load"))
        return load(atof(argv[2]), atoi(argv[3]), argv[4], argv[5], argc == 7 ? atof(argv[6]) : 0);
    fprintf(stderr, "usage: netload serve PORT NAME | netload load SECONDS CONCURRENCY SRCS DSTS [RATE]\n");
    return 2;
}
