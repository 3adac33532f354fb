//! svcproxyd as a node proxy watching a real Kubernetes API server (root only): etcd and
//! kube-apiserver, built from source by `tests/kube-servers/build.sh`, run on loopback inside
//! the node namespace of the test's topology (see `common/topology.rs`), with generated
//! certificates and static tokens: one for the test (group `system:masters`), one for
//! svcproxyd as the service account that `deploy/kubernetes/rbac.yaml` grants what it needs.
//! The test makes its objects through the API; svcproxyd serves them to the client pod.
//!
//! Without root the tests say they were skipped; under CI (`CI` set) they must run.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{GroupVersionKind, TypeMeta};
use kube::discovery::{Scope, pinned_kind};
use serde_json::{Value, json};

#[path = "common/topology.rs"]
mod topology;

use topology::{Pod, Topology, alone, root};

const BIN: &str = env!("CARGO_BIN_EXE_svcproxyd");
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long the API server may take to start (it sets up its system objects first).
const START_TIMEOUT: Duration = Duration::from_secs(120);
const API: &str = "127.0.0.1:6443";
const ADMIN_TOKEN: &str = "svcproxy-test-admin";
const PROXY_TOKEN: &str = "svcproxy-test-proxy";
const RBAC: &str = include_str!("../../deploy/kubernetes/rbac.yaml");

/// The directory holding `kube-apiserver` and `etcd`, built (once, cached) if need be.
fn servers() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/kube-servers/build.sh"
    );
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "{script} failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A process in namespace `ns`, its output in `log`.
fn spawn_in(ns: &str, program: &Path, args: &[String], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(program)
        .args(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn stop(child: &mut Child) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// etcd and kube-apiserver in the node namespace; stopped, and their files removed, when
/// dropped.
struct Cluster {
    ns: String,
    dir: PathBuf,
    bin: PathBuf,
    etcd: Child,
    apiserver: Option<Child>,
}

impl Cluster {
    fn start(topo: &Topology) -> Self {
        let bin = servers();
        let dir = std::env::temp_dir().join(format!("svcproxyd-kube-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let at = |f: &str| dir.join(f).to_str().unwrap().to_string();
        // A CA, the server's certificate for 127.0.0.1 signed by it, the service-account key.
        run(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=svcproxy-test-ca",
                "-keyout",
                &at("ca.key"),
                "-out",
                &at("ca.crt"),
            ],
        );
        run(
            "openssl",
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                "/CN=kube-apiserver",
                "-keyout",
                &at("server.key"),
                "-out",
                &at("server.csr"),
            ],
        );
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        run(
            "openssl",
            &[
                "x509",
                "-req",
                "-in",
                &at("server.csr"),
                "-CA",
                &at("ca.crt"),
                "-CAkey",
                &at("ca.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &at("san.ext"),
                "-out",
                &at("server.crt"),
            ],
        );
        run(
            "openssl",
            &[
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-noout",
                "-out",
                &at("sa.key"),
            ],
        );
        run(
            "openssl",
            &["ec", "-in", &at("sa.key"), "-pubout", "-out", &at("sa.pub")],
        );
        std::fs::write(
            dir.join("tokens.csv"),
            format!(
                "{ADMIN_TOKEN},svcproxy-test,1,\"system:masters\"\n\
                 {PROXY_TOKEN},system:serviceaccount:kube-system:svcproxyd,2,\"system:serviceaccounts,system:serviceaccounts:kube-system\"\n"
            ),
        )
        .unwrap();
        for (name, token) in [("admin", ADMIN_TOKEN), ("proxy", PROXY_TOKEN)] {
            std::fs::write(
                dir.join(format!("{name}.kubeconfig")),
                format!(
                    "apiVersion: v1\nkind: Config\n\
                     clusters: [{{name: test, cluster: {{server: 'https://{API}', certificate-authority: '{}'}}}}]\n\
                     users: [{{name: {name}, user: {{token: {token}}}}}]\n\
                     contexts: [{{name: test, context: {{cluster: test, user: {name}}}}}]\n\
                     current-context: test\n",
                    at("ca.crt")
                ),
            )
            .unwrap();
        }
        let etcd = spawn_in(
            &topo.node,
            &bin.join("etcd"),
            &[
                "--name=test".into(),
                format!("--data-dir={}", at("etcd")),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=test=http://127.0.0.1:2380".into(),
                "--log-level=warn".into(),
            ],
            &dir.join("etcd.log"),
        );
        let mut cluster = Self {
            ns: topo.node.clone(),
            dir,
            bin,
            etcd,
            apiserver: None,
        };
        cluster.start_apiserver();
        cluster.apply(documents(RBAC));
        cluster.apply(vec![namespace()]);
        cluster
    }

    fn path(&self, file: &str) -> String {
        self.dir.join(file).to_str().unwrap().to_string()
    }

    /// Starts kube-apiserver and waits until it serves (its system namespaces made).
    fn start_apiserver(&mut self) {
        let args = [
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            "--bind-address=127.0.0.1".into(),
            "--secure-port=6443".into(),
            "--advertise-address=198.18.1.1".into(),
            format!("--tls-cert-file={}", self.path("server.crt")),
            format!("--tls-private-key-file={}", self.path("server.key")),
            format!("--token-auth-file={}", self.path("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", self.path("sa.pub")),
            format!("--service-account-signing-key-file={}", self.path("sa.key")),
            "--service-cluster-ip-range=198.19.0.0/16".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--cert-dir={}", self.path("certs")),
        ];
        let log = self.dir.join("apiserver.log");
        let child = spawn_in(&self.ns, &self.bin.join("kube-apiserver"), &args, &log);
        self.apiserver = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let up = self.admin(|client| async move {
                let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
                namespaces.get("kube-system").await.is_ok()
            });
            if up {
                return;
            }
            let exited = self.apiserver.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "kube-apiserver did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop_apiserver(&mut self) {
        if let Some(mut child) = self.apiserver.take() {
            stop(&mut child);
        }
    }

    /// Runs `f` with a client of the test's user, inside the node namespace.
    fn admin<F, T>(&self, f: impl FnOnce(kube::Client) -> F + Send + 'static) -> T
    where
        F: Future<Output = T>,
        T: Send + 'static,
    {
        let kubeconfig = self.path("admin.kubeconfig");
        Topology::within(&self.ns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let file = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
                let config = kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .unwrap();
                f(kube::Client::try_from(config).unwrap()).await
            })
        })
    }

    /// Applies every object of `docs` (server-side apply), 16 at a time.
    fn apply(&self, docs: Vec<Value>) {
        self.admin(|client| async move {
            let mut kinds = std::collections::HashMap::new();
            let mut objects = Vec::new();
            for doc in docs {
                let object: DynamicObject = serde_json::from_value(doc).unwrap();
                let types = object.types.clone().unwrap();
                if !kinds.contains_key(&types.kind) {
                    let gvk = GroupVersionKind::try_from(&types).unwrap();
                    let found = pinned_kind(&client, &gvk).await.unwrap();
                    kinds.insert(types.kind.clone(), found);
                }
                objects.push((object, types.kind));
            }
            futures_util::stream::iter(objects)
                .for_each_concurrent(16, |(object, kind)| {
                    let (resource, capabilities) = &kinds[&kind];
                    apply(&client, object, resource, &capabilities.scope)
                })
                .await;
        });
    }

    /// Deletes the object `kind` (`apiVersion`, `kind`) `namespace/name`.
    fn delete(&self, api_version: &str, kind: &str, namespace: &str, name: &str) {
        let (types, namespace, name) = (
            TypeMeta {
                api_version: api_version.into(),
                kind: kind.into(),
            },
            namespace.to_string(),
            name.to_string(),
        );
        self.admin(|client| async move {
            let gvk = GroupVersionKind::try_from(&types).unwrap();
            let (resource, capabilities) = pinned_kind(&client, &gvk).await.unwrap();
            let api = dynamic(&client, &resource, &capabilities.scope, &namespace);
            api.delete(&name, &DeleteParams::default()).await.unwrap();
        });
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_apiserver();
        stop(&mut self.etcd);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The documents of a multi-document YAML text.
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn dynamic(
    client: &kube::Client,
    resource: &ApiResource,
    scope: &Scope,
    namespace: &str,
) -> Api<DynamicObject> {
    match scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, resource),
        Scope::Cluster => Api::all_with(client.clone(), resource),
    }
}

async fn apply(
    client: &kube::Client,
    object: DynamicObject,
    resource: &ApiResource,
    scope: &Scope,
) {
    let namespace = object.metadata.namespace.clone().unwrap_or_default();
    let name = object.metadata.name.clone().unwrap();
    let api = dynamic(client, resource, scope, &namespace);
    let params = PatchParams::apply("svcproxy-test").force();
    api.patch(&name, &params, &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("{} {namespace}/{name}: {e}", resource.kind));
}

/// The Service `name` in namespace `shop` at `cluster_ip`, port 80 to the pods' 8080.
fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": cluster_ip, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// The EndpointSlice of service `name` holding `pods`' addresses.
fn slice(name: &str, pods: &[&str]) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-1"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

const POD_A: &str = "198.18.2.2";
const POD_B: &str = "198.18.3.2";

/// svcproxyd in the node namespace, watching the API as its service account; killed when
/// dropped.
struct Proxy(Child);

impl Proxy {
    fn start(cluster: &Cluster) -> Self {
        let args = [
            "run".to_string(),
            format!("--kubeconfig={}", cluster.path("proxy.kubeconfig")),
            "--node-name=node".into(),
        ];
        let child = spawn_in(
            &cluster.ns,
            Path::new(BIN),
            &args,
            &cluster.dir.join("svcproxyd.log"),
        );
        let proxy = Self(child);
        let ns = cluster.ns.clone();
        wait("svcproxyd's health endpoint", START_TIMEOUT, || {
            let ns = ns.clone();
            Topology::within(&ns, || TcpStream::connect("127.0.0.1:10256").is_ok())
        });
        proxy
    }

    /// `/healthz`, as JSON.
    fn health(cluster: &Cluster) -> Value {
        let ns = cluster.ns.clone();
        let addr: SocketAddr = "127.0.0.1:10256".parse().unwrap();
        let (_, body) = Topology::within(&ns, move || http_get(addr, "/healthz"));
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        stop(&mut self.0);
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let status = reply.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        reply.split("\r\n\r\n").nth(1).unwrap_or("").to_string(),
    )
}

fn wait(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

/// The pod that answers a connection from the client pod to `vip` (`None`: nothing does).
fn served_by(topo: &Topology, vip: SocketAddr) -> Option<String> {
    Topology::within(&topo.client, move || {
        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(TIMEOUT)).ok()?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).ok()?;
        line.split_whitespace().next().map(str::to_string)
    })
}

/// The pods that answer `n` connections to `vip`.
fn served_n(topo: &Topology, vip: SocketAddr, n: usize) -> std::collections::BTreeSet<String> {
    (0..n).filter_map(|_| served_by(topo, vip)).collect()
}

fn pods(names: &[&str]) -> std::collections::BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

/// What each test runs in: the topology with its two pods, and the API servers in its node
/// namespace; torn down in that order (the servers first).
struct Stack {
    cluster: Cluster,
    _pods: [Pod; 2],
    topo: Topology,
    _alone: std::sync::MutexGuard<'static, ()>,
}

impl Stack {
    /// `None` (the test is skipped) without root.
    fn start() -> Option<Self> {
        if !root() {
            return None;
        }
        let alone = alone();
        let topo = Topology::new();
        let pods = [
            Pod::start(&topo.pods[0], "a"),
            Pod::start(&topo.pods[1], "b"),
        ];
        Some(Self {
            cluster: Cluster::start(&topo),
            _pods: pods,
            topo,
            _alone: alone,
        })
    }
}

/// The namespace of the tests' objects.
fn namespace() -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
}

/// Round robin over a Service's EndpointSlice; scaling up and down followed within a second;
/// an SCTP service and an FQDN slice beside it skipped; a deleted service stops answering;
/// with the API server stopped the table stays, and once it is back what changed meanwhile
/// is served.
#[test]
fn svcproxyd_serves_what_the_api_says_and_follows_its_changes() {
    let Some(mut stack) = Stack::start() else {
        return;
    };
    let (topo, cluster) = (&stack.topo, &mut stack.cluster);
    let sctp = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "sig", "namespace": "shop"},
        "spec": {"clusterIP": "198.19.0.20", "ports": [{"port": 2905, "protocol": "SCTP"}]},
    });
    let fqdn = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-fqdn", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "FQDN",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [{"addresses": ["pod.example"]}],
    });
    cluster.apply(vec![
        service("web", "198.19.0.10"),
        slice("web", &[POD_A]),
        sctp,
        fqdn,
    ]);
    let _proxy = Proxy::start(cluster);
    let web: SocketAddr = "198.19.0.10:80".parse().unwrap();
    assert_eq!(served_n(topo, web, 4), pods(&["a"]));
    let health = Proxy::health(cluster);
    assert!(health["kubernetesApi"]["synced"].is_string(), "{health}");
    assert_eq!(health["kubernetesApi"]["reachable"], true, "{health}");
    assert_eq!(
        health["skipped"]["api"]["notServed"], 2,
        "the SCTP service, the FQDN slice: {health}"
    );

    // Scaled up: both pods, in round robin.
    cluster.apply(vec![slice("web", &[POD_A, POD_B])]);
    let took = wait("the new endpoint", Duration::from_secs(1), || {
        served_n(topo, web, 2) == pods(&["a", "b"])
    });
    eprintln!("scaled up: followed in {took:?}");
    // Round robin: alternately.
    let order: Vec<String> = (0..4).filter_map(|_| served_by(topo, web)).collect();
    assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    // Scaled down to b.
    cluster.apply(vec![slice("web", &[POD_B])]);
    let took = wait("the endpoint removed", Duration::from_secs(1), || {
        served_n(topo, web, 4) == pods(&["b"])
    });
    eprintln!("scaled down: followed in {took:?}");

    // A second service, then deleted: it stops answering.
    let api: SocketAddr = "198.19.0.11:80".parse().unwrap();
    cluster.apply(vec![service("api", "198.19.0.11"), slice("api", &[POD_A])]);
    wait("the new service", TIMEOUT, || {
        served_by(topo, api).as_deref() == Some("a")
    });
    cluster.delete("v1", "Service", "shop", "api");
    wait("the service gone", TIMEOUT, || {
        served_by(topo, api).is_none()
    });

    // The API server stops: the table stays; svcproxyd says since when it is unreachable.
    cluster.stop_apiserver();
    wait("svcproxyd to see the API gone", TIMEOUT * 3, || {
        Proxy::health(cluster)["kubernetesApi"]["reachable"] == false
    });
    assert_eq!(served_n(topo, web, 2), pods(&["b"]), "served as it was");
    let health = Proxy::health(cluster);
    assert!(
        health["kubernetesApi"]["unreachableSince"].is_string(),
        "{health}"
    );
    assert!(health["kubernetesApi"]["lastError"].is_string(), "{health}");
    // Back, with changes made while svcproxyd was not watching (straight into etcd's keeping
    // by a new API server): they are served.
    cluster.start_apiserver();
    cluster.apply(vec![slice("web", &[POD_A])]);
    cluster.apply(vec![service("api", "198.19.0.11"), slice("api", &[POD_B])]);
    wait(
        "the changes made while the API was away",
        TIMEOUT * 6,
        || served_n(topo, web, 2) == pods(&["a"]) && served_by(topo, api).as_deref() == Some("b"),
    );
    wait("svcproxyd to see the API back", TIMEOUT, || {
        Proxy::health(cluster)["kubernetesApi"]["reachable"] == true
    });
}

/// The Go embedding's example controller (`ffi/go/examples/controller`: client-go informers
/// feeding an embedded proxy), built against the C library of this checkout; `None` (the test
/// is skipped) without Go, except under CI.
fn go_controller(dir: &Path) -> Option<PathBuf> {
    let go = ["/usr/local/go/bin/go", "go"].into_iter().find(|go| {
        Command::new(go)
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(go) = go else {
        assert!(std::env::var_os("CI").is_none(), "Go is required under CI");
        eprintln!("skipped: no Go toolchain");
        return None;
    };
    let target = std::env::current_exe().unwrap();
    let target = target.parent().and_then(Path::parent).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut cargo = Command::new(env!("CARGO"));
    cargo
        .args(["build", "-p", "svcproxy-ffi", "--lib"])
        .current_dir(repo);
    if target.ends_with("release") {
        cargo.arg("--release");
    }
    let built = cargo.output().unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let program = dir.join("controller");
    let go = |args: &[&str]| {
        let out = Command::new(go)
            .args(args)
            .current_dir(repo.join("ffi/go/examples/controller"))
            .env("CGO_ENABLED", "1")
            .env("CGO_LDFLAGS", format!("-L{}", target.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "go {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    go(&["vet", "."]);
    go(&["build", "-o", program.to_str().unwrap(), "."]);
    Some(program)
}

/// What a Go program embedding svcproxy does as a node's proxy: the example controller watches
/// the API with client-go informers as svcproxyd's service account and feeds the embedded
/// proxy; traffic from the client pod follows the API's changes (a new service, scaling up
/// and down, deletion).
#[test]
fn an_embedded_proxy_fed_by_client_go_follows_the_api() {
    let Some(stack) = Stack::start() else {
        return;
    };
    let (topo, cluster) = (&stack.topo, &stack.cluster);
    let Some(program) = go_controller(&cluster.dir) else {
        return;
    };
    // The embedded proxy listens on the cluster IPs themselves (svcproxyd's capture is not
    // there): they are local addresses of the node.
    run(
        "ip",
        &[
            "-n",
            &topo.node,
            "route",
            "add",
            "local",
            "198.19.0.0/16",
            "dev",
            "lo",
        ],
    );
    let web: SocketAddr = "198.19.0.30:80".parse().unwrap();
    cluster.apply(vec![
        service("go-web", "198.19.0.30"),
        slice("go-web", &[POD_A]),
    ]);
    let args = [
        format!("-kubeconfig={}", cluster.path("proxy.kubeconfig")),
        "-node=node".into(),
        "-workers=1".into(),
    ];
    let mut controller = spawn_in(
        &cluster.ns,
        &program,
        &args,
        &cluster.dir.join("controller.log"),
    );
    let log = || std::fs::read_to_string(cluster.dir.join("controller.log")).unwrap_or_default();
    wait("the controller to sync", START_TIMEOUT, || {
        assert!(
            controller.try_wait().unwrap().is_none(),
            "the controller exited:\n{}",
            log()
        );
        log().contains("synced")
    });
    assert_eq!(served_n(topo, web, 4), pods(&["a"]), "{}", log());

    cluster.apply(vec![slice("go-web", &[POD_A, POD_B])]);
    wait("the new endpoint", TIMEOUT, || {
        served_n(topo, web, 2) == pods(&["a", "b"])
    });
    cluster.apply(vec![slice("go-web", &[POD_B])]);
    wait("the endpoint removed", TIMEOUT, || {
        served_n(topo, web, 4) == pods(&["b"])
    });
    let api: SocketAddr = "198.19.0.31:80".parse().unwrap();
    cluster.apply(vec![
        service("go-api", "198.19.0.31"),
        slice("go-api", &[POD_A]),
    ]);
    wait("the new service", TIMEOUT, || {
        served_by(topo, api).as_deref() == Some("a")
    });
    cluster.delete("v1", "Service", "shop", "go-api");
    wait("the service gone", TIMEOUT, || {
        served_by(topo, api).is_none()
    });
    assert_eq!(
        served_n(topo, web, 2),
        pods(&["b"]),
        "the other service stays"
    );
    stop(&mut controller);
    assert!(
        !log().contains("retried"),
        "every change applied at once:\n{}",
        log()
    );
}

/// 1,000 services with their slices made at once: every one is served; how long it took is
/// printed (docs/BENCHMARKS.md records it).
#[test]
fn a_thousand_services_made_in_a_burst_are_all_served() {
    let Some(stack) = Stack::start() else {
        return;
    };
    let (topo, cluster) = (&stack.topo, &stack.cluster);
    let _proxy = Proxy::start(cluster);
    const N: usize = 1000;
    let ip = |i: usize| format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250);
    let mut docs = Vec::new();
    for i in 0..N {
        let name = format!("s{i}");
        docs.push(service(&name, &ip(i)));
        docs.push(slice(&name, &[if i % 2 == 0 { POD_A } else { POD_B }]));
    }
    let start = Instant::now();
    cluster.apply(docs);
    let made = start.elapsed();
    let vips: Vec<SocketAddr> = (0..N)
        .map(|i| format!("{}:80", ip(i)).parse().unwrap())
        .collect();
    let mut left = vips.clone();
    wait("every service", Duration::from_secs(120), || {
        left.retain(|vip| served_by(topo, *vip).is_none());
        left.is_empty()
    });
    let served = start.elapsed();
    eprintln!(
        "{N} services and slices: made through the API in {made:?}, all served after {served:?}"
    );
    for (i, vip) in vips.iter().enumerate().step_by(97) {
        let expected = if i % 2 == 0 { "a" } else { "b" };
        assert_eq!(served_by(topo, *vip).as_deref(), Some(expected), "{vip}");
    }
}

/// A value of the metrics endpoint (`series` with its labels, as printed), in the node.
fn metric(cluster: &Cluster, series: &str) -> f64 {
    let ns = cluster.ns.clone();
    let addr: SocketAddr = "127.0.0.1:10249".parse().unwrap();
    let (_, text) = Topology::within(&ns, move || http_get(addr, "/metrics"));
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The benchmark of docs/BENCHMARKS.md, "Kubernetes API: event to table": 10,000 services with
/// 10 endpoints each (100,000), then one EndpointSlice changed at a time; prints the medians
/// of the time from the watch event to the table and to the workers, and of the network
/// programming latency (from the slice's trigger time, set as it is written). Run with
/// `cargo test --release -p svcproxyd --test kube_api -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark: minutes of setup"]
fn event_to_table_at_10k_services_and_100k_endpoints() {
    let Some(stack) = Stack::start() else {
        return;
    };
    let cluster = &stack.cluster;
    const N: usize = 10_000;
    const ROUNDS: usize = 21;
    let ip = |i: usize| format!("198.19.{}.{}", 1 + i / 250, 1 + i % 250);
    let endpoints = |i: usize, round: usize| -> Vec<String> {
        (0..10)
            .map(|j| format!("198.18.{}.{}", 4 + j, 1 + (i + round) % 250))
            .collect()
    };
    let start = Instant::now();
    let mut docs = Vec::new();
    for i in 0..N {
        let name = format!("s{i}");
        let eps = endpoints(i, 0);
        docs.push(service(&name, &ip(i)));
        docs.push(slice(
            &name,
            &eps.iter().map(String::as_str).collect::<Vec<_>>(),
        ));
    }
    cluster.apply(docs);
    eprintln!("{N} services and slices made in {:?}", start.elapsed());
    let started = Instant::now();
    let _proxy = Proxy::start(cluster);
    wait(
        "every service in the table",
        Duration::from_secs(300),
        || metric(cluster, "svcproxy_table_services") >= N as f64,
    );
    eprintln!("listed and published in {:?}", started.elapsed());
    let series = [
        "svcproxy_api_event_to_table_seconds",
        "svcproxy_api_event_to_workers_seconds",
        "kubeproxy_network_programming_duration_seconds",
    ];
    let mut seen: Vec<Vec<f64>> = vec![Vec::new(); series.len()];
    for round in 1..=ROUNDS {
        let sums: Vec<(f64, f64)> = series
            .iter()
            .map(|s| {
                (
                    metric(cluster, &format!("{s}_sum")),
                    metric(cluster, &format!("{s}_count")),
                )
            })
            .collect();
        let i = round * 37 % N;
        let name = format!("s{i}");
        let eps = endpoints(i, round);
        let mut changed = slice(&name, &eps.iter().map(String::as_str).collect::<Vec<_>>());
        let now = humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string();
        changed["metadata"]["annotations"] =
            json!({"endpoints.kubernetes.io/last-change-trigger-time": now});
        cluster.apply(vec![changed]);
        wait("the change measured", TIMEOUT, || {
            series
                .iter()
                .zip(&sums)
                .all(|(s, (_, count))| metric(cluster, &format!("{s}_count")) > *count)
        });
        for (k, s) in series.iter().enumerate() {
            seen[k].push(metric(cluster, &format!("{s}_sum")) - sums[k].0);
        }
    }
    for (s, values) in series.iter().zip(seen) {
        let (lo, hi) = values
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), v| (l.min(*v), h.max(*v)));
        eprintln!(
            "{s}: median {:.3} ms (min {:.3}, max {:.3}) over {ROUNDS} changes",
            median(values) * 1e3,
            lo * 1e3,
            hi * 1e3
        );
    }
}
