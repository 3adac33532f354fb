/* Embeds svcproxy in a C program: two backends on loopback, a service in front of them, and
 * six connections that go round robin. Build (from the repository root):
 *   cargo build --release -p svcproxy-ffi
 *   cc -Wall -Wextra -Iffi/include ffi/examples/c/roundrobin.c \
 *      target/release/libsvcproxy_ffi.a -lpthread -ldl -lm -o roundrobin && ./roundrobin
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "svcproxy.h"

struct backend {
    int fd;
    const char *name;
};

static void *serve(void *arg) {
    struct backend *b = arg;
    for (;;) {
        int c = accept(b->fd, NULL, NULL);
        if (c < 0) return NULL;
        if (write(c, b->name, strlen(b->name)) < 0) perror("write");
        close(c);
    }
}

static int listen_loopback(unsigned short *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 16) != 0) return -1;
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

int main(void) {
    char err[256];
    unsigned short pa, pb, vip;
    struct backend a = {listen_loopback(&pa), "alpha"}, b = {listen_loopback(&pb), "bravo"};
    int probe = listen_loopback(&vip); /* a free port for the service */
    close(probe);
    pthread_t ta, tb;
    pthread_create(&ta, NULL, serve, &a);
    pthread_create(&tb, NULL, serve, &b);

    svcproxy_options opts;
    svcproxy_options_default(&opts);
    svcproxy_proxy *proxy;
    if (svcproxy_proxy_new(&opts, &proxy, err, sizeof err) != SVCPROXY_RESULT_OK) {
        fprintf(stderr, "svcproxy_proxy_new: %s\n", err);
        return 1;
    }

    const char *addresses[] = {"127.0.0.1"};
    svcproxy_port port = {.protocol = SVCPROXY_PROTOCOL_TCP, .port = vip};
    svcproxy_service web = {.name = "demo/web", .addresses = addresses, .addresses_len = 1,
                            .ports = &port, .ports_len = 1, .policy = SVCPROXY_POLICY_ROUND_ROBIN};
    char ea[32], eb[32];
    snprintf(ea, sizeof ea, "127.0.0.1:%u", pa);
    snprintf(eb, sizeof eb, "127.0.0.1:%u", pb);
    svcproxy_endpoint endpoints[] = {
        {.address = ea, .ready = true, .serving = true, .weight = 1},
        {.address = eb, .ready = true, .serving = true, .weight = 1},
    };
    svcproxy_batch *batch;
    svcproxy_batch_new(&batch);
    if (svcproxy_batch_upsert_service(batch, &web, err, sizeof err) != SVCPROXY_RESULT_OK ||
        svcproxy_batch_replace_endpoints(batch, "demo/web", endpoints, 2, err, sizeof err) != SVCPROXY_RESULT_OK ||
        svcproxy_proxy_apply(proxy, batch, NULL, err, sizeof err) != SVCPROXY_RESULT_OK ||
        svcproxy_proxy_start(proxy, err, sizeof err) != SVCPROXY_RESULT_OK) {
        fprintf(stderr, "svcproxy: %s\n", err);
        return 1;
    }
    svcproxy_batch_free(batch);
    printf("svcproxy %s serving 127.0.0.1:%u with the %s backend\n", svcproxy_version(), vip,
           svcproxy_proxy_backend(proxy) == SVCPROXY_BACKEND_IO_URING ? "io_uring" : "epoll");

    for (int i = 0; i < 6; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in s = {.sin_family = AF_INET, .sin_port = htons(vip),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        char reply[16] = {0};
        if (connect(fd, (struct sockaddr *)&s, sizeof s) == 0 && read(fd, reply, sizeof reply - 1) > 0)
            printf("connection %d answered by %s\n", i + 1, reply);
        close(fd);
    }

    svcproxy_port_stats stats[1];
    size_t count;
    if (svcproxy_proxy_port_stats(proxy, stats, 1, &count, err, sizeof err) == SVCPROXY_RESULT_OK)
        printf("%s/%s: %llu connections\n", stats[0].service, stats[0].port,
               (unsigned long long)stats[0].totals.connections_total);
    svcproxy_proxy_shutdown(proxy, 1000, err, sizeof err);
    svcproxy_proxy_free(proxy);
    shutdown(a.fd, SHUT_RDWR);
    shutdown(b.fd, SHUT_RDWR);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    return 0;
}
