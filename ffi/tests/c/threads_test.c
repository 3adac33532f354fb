/* Threads sharing handles: four threads add services to one batch while two others apply it
 * and read the table, all on one proxy. Every addition must land whole, and the last apply
 * must publish them all. Built with -Wall -Wextra -Werror and AddressSanitizer by
 * tests/c_api.rs. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "svcproxy.h"

#define ADDERS 4
#define PER_ADDER 100

static svcproxy_proxy *proxy;
static svcproxy_batch *batch;
static int failures = 0;
static pthread_mutex_t failures_lock = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *what, const char *err) {
    pthread_mutex_lock(&failures_lock);
    fprintf(stderr, "%s: %s\n", what, err);
    failures++;
    pthread_mutex_unlock(&failures_lock);
}

static void *adder(void *arg) {
    int id = *(int *)arg;
    char err[256];
    for (int j = 0; j < PER_ADDER; j++) {
        char name[32];
        snprintf(name, sizeof name, "t%d/s%d", id, j);
        const char *addrs[] = {"127.0.0.1"};
        svcproxy_port port = {NULL, SVCPROXY_PROTOCOL_TCP, (uint16_t)(20000 + id * 1000 + j), 0, NULL, 0};
        svcproxy_service svc = {.name = name, .addresses = addrs, .addresses_len = 1, .ports = &port, .ports_len = 1};
        if (svcproxy_batch_upsert_service(batch, &svc, err, sizeof err) != SVCPROXY_RESULT_OK)
            fail("upsert", err);
        svcproxy_endpoint ep = {.address = "127.0.0.1:9", .ready = true, .serving = true, .weight = 1};
        if (svcproxy_batch_replace_endpoints(batch, name, &ep, 1, err, sizeof err) !=
            SVCPROXY_RESULT_OK)
            fail("replace_endpoints", err);
    }
    return NULL;
}

static void *applier(void *arg) {
    (void)arg;
    char err[256];
    for (int i = 0; i < 50; i++) {
        /* A partial batch is consistent too: each service came with its endpoints. */
        if (svcproxy_proxy_apply(proxy, batch, NULL, err, sizeof err) != SVCPROXY_RESULT_OK)
            fail("apply", err);
        size_t needed = 0;
        svcproxy_proxy_table_json(proxy, NULL, 0, &needed, err, sizeof err);
        if (needed == 0) fail("table_json", err);
    }
    return NULL;
}

static size_t count(const char *haystack, const char *needle) {
    size_t n = 0;
    for (const char *p = strstr(haystack, needle); p; p = strstr(p + 1, needle)) n++;
    return n;
}

int main(void) {
    char err[256];
    svcproxy_options opts;
    svcproxy_options_default(&opts);
    if (svcproxy_proxy_new(&opts, &proxy, err, sizeof err) != SVCPROXY_RESULT_OK) {
        fprintf(stderr, "new: %s\n", err);
        return 1;
    }
    svcproxy_batch_new(&batch);
    pthread_t threads[ADDERS + 2];
    int ids[ADDERS];
    for (int i = 0; i < ADDERS; i++) {
        ids[i] = i;
        pthread_create(&threads[i], NULL, adder, &ids[i]);
    }
    pthread_create(&threads[ADDERS], NULL, applier, NULL);
    pthread_create(&threads[ADDERS + 1], NULL, applier, NULL);
    for (int i = 0; i < ADDERS + 2; i++) pthread_join(threads[i], NULL);

    if (svcproxy_proxy_apply(proxy, batch, NULL, err, sizeof err) != SVCPROXY_RESULT_OK)
        fail("last apply", err);
    size_t needed = 0;
    svcproxy_proxy_table_json(proxy, NULL, 0, &needed, err, sizeof err);
    char *doc = malloc(needed);
    svcproxy_proxy_table_json(proxy, doc, needed, NULL, err, sizeof err);
    size_t services = count(doc, "\"name\":\"t");
    if (services != ADDERS * PER_ADDER) {
        fprintf(stderr, "the table has %zu services, not %d\n", services, ADDERS * PER_ADDER);
        failures++;
    }
    free(doc);
    svcproxy_batch_free(batch);
    svcproxy_proxy_free(proxy);
    if (failures) return 1;
    printf("%d services from %d threads on one batch\n", ADDERS * PER_ADDER, ADDERS);
    return 0;
}
