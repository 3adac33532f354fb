/* Exercises every function of the C API, including every error path, against a real proxy
 * on loopback. Built with -Wall -Wextra -Werror and AddressSanitizer by tests/c_api.rs.
 * Exits 0 when every check passes; prints the failed check otherwise. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "svcproxy.h"

static int failures = 0;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            failures++;                                                      \
        }                                                                    \
    } while (0)

/* A backend that answers each connection with its port number, then closes. */
static void *backend(void *arg) {
    int fd = *(int *)arg;
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) return NULL;
        struct sockaddr_in me;
        socklen_t len = sizeof me;
        getsockname(fd, (struct sockaddr *)&me, &len);
        char line[16];
        int n = snprintf(line, sizeof line, "%d\n", ntohs(me.sin_port));
        if (write(c, line, (size_t)n) != n) perror("write");
        close(c);
    }
}

static int listen_loopback(unsigned short *port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(fd, (struct sockaddr *)&a, sizeof a);
    listen(fd, 64);
    socklen_t len = sizeof a;
    getsockname(fd, (struct sockaddr *)&a, &len);
    *port = ntohs(a.sin_port);
    return fd;
}

static int ask(unsigned short port, char *out, size_t cap) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(0x7f000001);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    ssize_t n = read(fd, out, cap - 1);
    close(fd);
    if (n <= 0) return -1;
    out[n] = 0;
    return 0;
}

int main(void) {
    char err[256];
    svcproxy_result r;

    /* Version. */
    CHECK(svcproxy_version() != NULL && strlen(svcproxy_version()) > 0);

    /* Options. */
    CHECK(svcproxy_options_default(NULL) == SVCPROXY_RESULT_NULL);
    svcproxy_options opts;
    CHECK(svcproxy_options_default(&opts) == SVCPROXY_RESULT_OK);
    opts.workers = 2;

    /* proxy_new: NULL arguments and bad options. */
    svcproxy_proxy *proxy = NULL;
    CHECK(svcproxy_proxy_new(NULL, &proxy, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(strstr(err, "options") != NULL);
    CHECK(svcproxy_proxy_new(&opts, NULL, err, sizeof err) == SVCPROXY_RESULT_NULL);
    svcproxy_options bad = opts;
    bad.backend = 7;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "options.backend") != NULL);
    bad = opts;
    bad.connect_attempts = 0;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "connect_attempts") != NULL);
    bad = opts;
    bad.forwarding = 9;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "options.forwarding") != NULL);
    bad = opts;
    const char *bad_node[] = {"127.0.0.1", "node-a"};
    bad.node_addresses = bad_node;
    bad.node_addresses_len = 2;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "options.node_addresses[1]") != NULL);
    bad = opts;
    const char *bad_cidr[] = {"198.18.0.0/33"};
    bad.cluster_cidrs = bad_cidr;
    bad.cluster_cidrs_len = 1;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "options.cluster_cidrs[0]") != NULL);
    bad.cluster_cidrs = NULL;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(strstr(err, "options.cluster_cidrs") != NULL);
    bad = opts;
    bad.max_udp_flows = 0;
    CHECK(svcproxy_proxy_new(&bad, &proxy, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "max_udp_flows") != NULL);
    /* A tiny error buffer still gets a terminated, truncated message. */
    char tiny[4];
    CHECK(svcproxy_proxy_new(&bad, &proxy, tiny, sizeof tiny) == SVCPROXY_RESULT_INVALID);
    CHECK(strlen(tiny) == 3);
    CHECK(svcproxy_proxy_new(&bad, &proxy, NULL, 0) == SVCPROXY_RESULT_INVALID);

    CHECK(svcproxy_proxy_new(&opts, &proxy, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(proxy != NULL);
    CHECK(svcproxy_proxy_backend(proxy) == SVCPROXY_BACKEND_AUTO);
    CHECK(svcproxy_proxy_backend(NULL) == SVCPROXY_BACKEND_AUTO);

    /* State errors before start. */
    CHECK(svcproxy_proxy_shutdown(proxy, 0, err, sizeof err) == SVCPROXY_RESULT_STATE);
    CHECK(svcproxy_proxy_sync(proxy, 100, NULL, err, sizeof err) == SVCPROXY_RESULT_STATE);
    CHECK(svcproxy_proxy_attach_socket_lb(proxy, NULL, err, sizeof err) == SVCPROXY_RESULT_STATE);
    CHECK(strstr(err, "not running") != NULL);
    CHECK(svcproxy_proxy_detach_socket_lb(proxy, err, sizeof err) == SVCPROXY_RESULT_STATE);
    CHECK(svcproxy_proxy_attach_socket_lb(NULL, NULL, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_proxy_start(NULL, err, sizeof err) == SVCPROXY_RESULT_NULL);

    /* Two backends. */
    unsigned short p1, p2, vip_port;
    int f1 = listen_loopback(&p1), f2 = listen_loopback(&p2);
    int probe = listen_loopback(&vip_port);
    close(probe);
    pthread_t t1, t2;
    pthread_create(&t1, NULL, backend, &f1);
    pthread_create(&t2, NULL, backend, &f2);

    /* A batch: service with two endpoints. */
    svcproxy_batch *batch = NULL;
    CHECK(svcproxy_batch_new(NULL) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_batch_new(&batch) == SVCPROXY_RESULT_OK);
    const char *addrs[] = {"127.0.0.1"};
    svcproxy_port port = {NULL, SVCPROXY_PROTOCOL_TCP, vip_port, 0, NULL, 0};
    svcproxy_service svc = {.name = "c/web", .addresses = addrs, .addresses_len = 1, .ports = &port, .ports_len = 1};
    CHECK(svcproxy_batch_upsert_service(NULL, &svc, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_batch_upsert_service(batch, NULL, err, sizeof err) == SVCPROXY_RESULT_NULL);
    /* Bad service fields are named. */
    svcproxy_service broken = svc;
    const char *bad_addrs[] = {"not-an-ip"};
    broken.addresses = bad_addrs;
    CHECK(svcproxy_batch_upsert_service(batch, &broken, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "service.addresses[0]") != NULL);
    broken = svc;
    broken.addresses = NULL;
    CHECK(svcproxy_batch_upsert_service(batch, &broken, err, sizeof err) == SVCPROXY_RESULT_NULL);
    broken = svc;
    broken.policy = 99;
    CHECK(svcproxy_batch_upsert_service(batch, &broken, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "service.policy") != NULL);
    broken = svc;
    const char *bad_range[] = {"198.18.0.1"};
    broken.load_balancer_source_ranges = bad_range;
    broken.load_balancer_source_ranges_len = 1;
    CHECK(svcproxy_batch_upsert_service(batch, &broken, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "service.load_balancer_source_ranges[0]") != NULL);
    /* Load balancer addresses and source ranges reach the table (checked in its JSON below). */
    const char *lb[] = {"127.0.0.9"};
    const char *ranges[] = {"127.0.0.0/8"};
    svc.load_balancer_addresses = lb;
    svc.load_balancer_addresses_len = 1;
    svc.load_balancer_source_ranges = ranges;
    svc.load_balancer_source_ranges_len = 1;
    CHECK(svcproxy_batch_upsert_service(batch, &svc, err, sizeof err) == SVCPROXY_RESULT_OK);

    char a1[32], a2[32];
    snprintf(a1, sizeof a1, "127.0.0.1:%u", p1);
    snprintf(a2, sizeof a2, "127.0.0.1:%u", p2);
    svcproxy_endpoint eps[2] = {
        {.address = a1, .ready = true, .serving = true, .weight = 1},
        {.address = a2, .ready = true, .serving = true, .weight = 1, .node = "node-a", .zone = "zone-1"},
    };
    const char *zones[] = {"zone-1"};
    eps[1].for_zones = zones;
    eps[1].for_zones_len = 1;
    /* An array that is NULL but has a length. */
    svcproxy_endpoint bad_ep = {.address = a1, .ready = true, .weight = 1, .for_nodes_len = 1};
    CHECK(svcproxy_batch_replace_endpoints(batch, "c/web", &bad_ep, 1, err, sizeof err) ==
          SVCPROXY_RESULT_NULL);
    CHECK(strstr(err, "endpoints[0].for_nodes") != NULL);
    bad_ep = (svcproxy_endpoint){.address = "127.0.0.1:not-a-port", .ready = true, .serving = true, .weight = 1};
    CHECK(svcproxy_batch_replace_endpoints(batch, "c/web", &bad_ep, 1, err, sizeof err) ==
          SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "endpoints[0].address") != NULL);
    CHECK(svcproxy_batch_replace_endpoints(batch, "c/web", NULL, 2, err, sizeof err) ==
          SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_batch_replace_endpoints(batch, NULL, eps, 2, err, sizeof err) ==
          SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_batch_replace_endpoints(batch, "c/web", eps, 2, err, sizeof err) ==
          SVCPROXY_RESULT_OK);

    /* Apply before start works; the proxy picks the table up when it starts. */
    uint64_t gen = 0;
    CHECK(svcproxy_proxy_apply(NULL, batch, &gen, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_proxy_apply(proxy, NULL, &gen, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_proxy_apply(proxy, batch, &gen, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(gen == 1);
    r = svcproxy_proxy_start(proxy, err, sizeof err);
    CHECK(r == SVCPROXY_RESULT_OK);
    if (r != SVCPROXY_RESULT_OK) fprintf(stderr, "start: %s\n", err);
    CHECK(svcproxy_proxy_start(proxy, err, sizeof err) == SVCPROXY_RESULT_STATE);
    CHECK(svcproxy_proxy_backend(proxy) != SVCPROXY_BACKEND_AUTO);

    /* Traffic goes round robin. */
    char reply[32], first[32];
    CHECK(ask(vip_port, first, sizeof first) == 0);
    CHECK(ask(vip_port, reply, sizeof reply) == 0);
    CHECK(strcmp(reply, first) != 0);
    CHECK(ask(vip_port, reply, sizeof reply) == 0);
    CHECK(strcmp(reply, first) == 0);

    /* Errors from the table leave it unchanged. */
    svcproxy_batch *bad_batch = NULL;
    CHECK(svcproxy_batch_new(&bad_batch) == SVCPROXY_RESULT_OK);
    CHECK(svcproxy_batch_remove_service(bad_batch, NULL, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_batch_remove_service(NULL, "x", err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_batch_remove_service(bad_batch, "c/missing", err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(svcproxy_proxy_apply(proxy, bad_batch, &gen, err, sizeof err) == SVCPROXY_RESULT_UNKNOWN_SERVICE);
    CHECK(strstr(err, "c/missing") != NULL);
    svcproxy_batch_free(bad_batch);
    CHECK(svcproxy_batch_new(&bad_batch) == SVCPROXY_RESULT_OK);
    svcproxy_service twin = svc;
    twin.name = "c/twin";
    CHECK(svcproxy_batch_upsert_service(bad_batch, &twin, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(svcproxy_proxy_apply(proxy, bad_batch, &gen, err, sizeof err) == SVCPROXY_RESULT_CONFLICT);
    svcproxy_batch_free(bad_batch);
    svcproxy_batch_free(NULL);

    /* JSON. */
    CHECK(svcproxy_proxy_apply_json(proxy, "{not json", &gen, err, sizeof err) == SVCPROXY_RESULT_JSON);
    CHECK(strstr(err, "batch JSON") != NULL);
    CHECK(svcproxy_proxy_apply_json(proxy, NULL, &gen, err, sizeof err) == SVCPROXY_RESULT_NULL);
    CHECK(svcproxy_proxy_apply_json(proxy, "{\"remove\": [\"c/ghost\"]}", &gen, err, sizeof err) ==
          SVCPROXY_RESULT_UNKNOWN_SERVICE);
    CHECK(svcproxy_proxy_apply_json(
              proxy, "{\"upsert\": [{\"name\": \"c/j\", \"addresses\": [\"127.0.0.1\"], \"ports\": [{\"port\": 1}], "
                     "\"endpoints\": [{\"address\": \"bogus\"}]}]}",
              &gen, err, sizeof err) == SVCPROXY_RESULT_INVALID);
    CHECK(strstr(err, "endpoints[0].address") != NULL);
    CHECK(svcproxy_proxy_apply_json(proxy, "{\"upsert\": [{\"name\": \"c/j\", \"addresses\": [\"127.0.0.2\"], "
                                           "\"ports\": [{\"port\": 7, \"protocol\": \"UDP\"}]}]}",
                                    &gen, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(gen == 2);
    CHECK(svcproxy_proxy_sync(proxy, 5000, &gen, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(gen == 2);

    /* Socket-level load balancing: a directory that is not a cgroup fails with the reason,
     * and the proxy serves on (the Go tests attach to a real cgroup). */
    CHECK(svcproxy_proxy_attach_socket_lb(proxy, "/", err, sizeof err) == SVCPROXY_RESULT_START);
    CHECK(strstr(err, "socket-level load balancing") != NULL);
    CHECK(svcproxy_proxy_detach_socket_lb(proxy, err, sizeof err) == SVCPROXY_RESULT_OK);

    /* Table JSON: size query, then the document. */
    size_t needed = 0;
    CHECK(svcproxy_proxy_table_json(proxy, NULL, 0, &needed, err, sizeof err) == SVCPROXY_RESULT_BUFFER);
    CHECK(needed > 10);
    char *doc = malloc(needed);
    CHECK(svcproxy_proxy_table_json(proxy, doc, needed, NULL, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(strstr(doc, "\"c/web\"") != NULL && strstr(doc, "\"c/j\"") != NULL);
    CHECK(strstr(doc, "\"load_balancer_addresses\":[\"127.0.0.9\"]") != NULL);
    CHECK(strstr(doc, "\"load_balancer_source_ranges\":[\"127.0.0.0/8\"]") != NULL);
    CHECK(strstr(doc, "\"for_zones\":[\"zone-1\"]") != NULL);
    free(doc);

    /* Statistics into caller memory. */
    size_t count = 0;
    CHECK(svcproxy_proxy_port_stats(proxy, NULL, 0, &count, err, sizeof err) == SVCPROXY_RESULT_BUFFER);
    CHECK(count == 2);
    CHECK(svcproxy_proxy_port_stats(proxy, NULL, 1, &count, err, sizeof err) == SVCPROXY_RESULT_NULL);
    svcproxy_port_stats ports[2];
    CHECK(svcproxy_proxy_port_stats(proxy, ports, 2, &count, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(strcmp(ports[1].service, "c/web") == 0);
    CHECK(ports[1].protocol == SVCPROXY_PROTOCOL_TCP);
    CHECK(ports[1].totals.connections_total == 3);
    CHECK(ports[1].endpoints == 2);
    svcproxy_endpoint_stats eps_stats[4];
    CHECK(svcproxy_proxy_endpoint_stats(proxy, eps_stats, 4, &count, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(count == 2);
    CHECK(eps_stats[0].counters.connections_total + eps_stats[1].counters.connections_total == 3);
    CHECK(strncmp(eps_stats[0].address, "127.0.0.1:", 10) == 0);
    char stats_json[4096];
    CHECK(svcproxy_proxy_stats_json(proxy, stats_json, sizeof stats_json, &needed, err, sizeof err) ==
          SVCPROXY_RESULT_OK);
    CHECK(strstr(stats_json, "\"connections_total\":3") != NULL);
    CHECK(svcproxy_proxy_stats_json(NULL, stats_json, sizeof stats_json, &needed, err, sizeof err) ==
          SVCPROXY_RESULT_NULL);

    /* Shutdown, then restart and free while running. */
    CHECK(svcproxy_proxy_shutdown(proxy, 1000, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(ask(vip_port, reply, sizeof reply) != 0);
    CHECK(svcproxy_proxy_start(proxy, err, sizeof err) == SVCPROXY_RESULT_OK);
    CHECK(ask(vip_port, reply, sizeof reply) == 0);
    svcproxy_batch_free(batch);
    svcproxy_proxy_free(proxy);
    svcproxy_proxy_free(NULL);

    /* Create, use and free objects many times: nothing may leak per call (the leak checker
     * run by tests/c_api.rs bounds what is left at exit). */
    for (int i = 0; i < 200; i++) {
        svcproxy_proxy *p = NULL;
        svcproxy_batch *b = NULL;
        CHECK(svcproxy_proxy_new(&opts, &p, err, sizeof err) == SVCPROXY_RESULT_OK);
        CHECK(svcproxy_batch_new(&b) == SVCPROXY_RESULT_OK);
        CHECK(svcproxy_batch_upsert_service(b, &svc, err, sizeof err) == SVCPROXY_RESULT_OK);
        CHECK(svcproxy_batch_replace_endpoints(b, "c/web", eps, 2, err, sizeof err) == SVCPROXY_RESULT_OK);
        CHECK(svcproxy_proxy_apply(p, b, NULL, err, sizeof err) == SVCPROXY_RESULT_OK);
        CHECK(svcproxy_proxy_apply_json(p, "{bad", NULL, err, sizeof err) == SVCPROXY_RESULT_JSON);
        CHECK(svcproxy_proxy_table_json(p, NULL, 0, &needed, err, sizeof err) == SVCPROXY_RESULT_BUFFER);
        svcproxy_batch_free(b);
        svcproxy_proxy_free(p);
    }

    shutdown(f1, SHUT_RDWR);
    shutdown(f2, SHUT_RDWR);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    close(f1);
    close(f2);
    if (failures) {
        fprintf(stderr, "%d checks failed\n", failures);
        return 1;
    }
    printf("all C API checks passed\n");
    return 0;
}
