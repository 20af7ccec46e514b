//! Shared test harness: one Tansu broker and one embedded registry per test binary, topic and
//! group names that never collide, and a naive reference implementation of the QoS rules.
#![allow(dead_code)]

pub mod kafka;
pub mod qos;
pub mod reference;
pub mod resume;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use marquee::io::registry::EmbeddedRegistry;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

/// A Tansu broker on a free loopback port, killed with the test process.
pub struct Broker {
    pub addr: String,
    _child: Child,
}

/// Test logging, filtered by RUST_LOG (default `warn`); set up once per test binary.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The Tansu broker shared by every test in this binary (also sets up test logging).
pub fn broker() -> &'static Broker {
    init_logging();
    static BROKER: OnceLock<Broker> = OnceLock::new();
    BROKER.get_or_init(start_tansu)
}

fn tansu_binary() -> String {
    let candidates = [
        std::env::var("TANSU").ok(),
        std::env::var("CARGO_HOME")
            .ok()
            .map(|h| format!("{h}/bin/tansu")),
        std::env::var("HOME")
            .ok()
            .map(|h| format!("{h}/.cargo/bin/tansu")),
    ];
    for path in candidates.into_iter().flatten() {
        if std::path::Path::new(&path).is_file() {
            return path;
        }
    }
    if Command::new("tansu").arg("--version").output().is_ok() {
        return "tansu".into();
    }
    panic!(
        "the Tansu Kafka broker is needed for this test and was not found.\n\
         Install it with: cargo install tansu --locked --features dynostore\n\
         (or run `bash .ci/run`, which installs everything the tests need)"
    );
}

/// Spawns `command` (a broker) so that it gets SIGKILL when the test process exits.
pub fn spawn_tied_to_test_process(mut command: Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe; it makes the broker die with the test process.
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    // PR_SET_PDEATHSIG fires when the spawning *thread* exits, so spawn from a thread that
    // lives as long as the test process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(command.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("spawner thread answers")
}

fn start_tansu() -> Broker {
    let binary = tansu_binary();
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let mut command = Command::new(&binary);
    command
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = spawn_tied_to_test_process(command)
        .unwrap_or_else(|e| panic!("cannot start {binary}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "Tansu did not listen on port {port} within 30s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker {
        addr: format!("127.0.0.1:{port}"),
        _child: child,
    }
}

/// The schema registry shared by every test in this binary.
pub fn registry() -> &'static EmbeddedRegistry {
    static REGISTRY: OnceLock<EmbeddedRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| EmbeddedRegistry::start().expect("embedded registry starts"))
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A name no other test (or earlier run against the same broker) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        marquee::runtime::wall_clock_ms() % 1_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Creates `topic` with `partitions` partitions and waits until its metadata shows them.
pub fn create_topic(brokers: &str, topic: &str, partitions: i32) {
    let config = marquee::io::sink::producer_config(brokers, &Default::default());
    let spec = marquee::io::sink::TopicSpec {
        name: topic,
        partitions: Some(partitions),
        replication_factor: None,
        configs: &[],
    };
    marquee::io::sink::ensure_topics(&config, &[spec]).expect("the test broker is reachable");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("metadata client");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len()))
            .unwrap_or(0);
        if found as i32 == partitions {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "topic {topic} has {found} partitions, expected {partitions}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One record read back from a topic.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl Consumed {
    /// The value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The key as UTF-8.
    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
}

/// Reads `topic` from the beginning until at least `expected` records arrived and nothing new
/// came for `quiet`, or `timeout` passed.
pub fn read_topic(
    brokers: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    read_topic_as(brokers, topic, expected, quiet, timeout, "read_uncommitted")
}

/// [`read_topic`] as a `read_committed` consumer: records of aborted transactions are never
/// seen.
pub fn read_committed(
    brokers: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<Consumed> {
    read_topic_as(brokers, topic, expected, quiet, timeout, "read_committed")
}

fn read_topic_as(
    brokers: &str,
    topic: &str,
    expected: usize,
    quiet: Duration,
    timeout: Duration,
    isolation: &str,
) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .set("isolation.level", isolation)
        .create()
        .expect("reader consumer");
    // The topic may not exist yet (the pipeline creates its outputs as it starts).
    let partitions: Vec<i32> = wait_for(&format!("topic {topic} to exist"), timeout, || {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let ids: Vec<i32> = metadata
            .topics()
            .first()?
            .partitions()
            .iter()
            .map(|p| p.id())
            .collect();
        (!ids.is_empty()).then_some(ids)
    });
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut last_new = Instant::now();
    while Instant::now() < deadline {
        if out.len() >= expected && last_new.elapsed() >= quiet {
            break;
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_string(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Consumed {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    value: m.payload().map(<[u8]>::to_vec),
                    headers,
                });
                last_new = Instant::now();
            }
            Some(Err(e)) => eprintln!("reading {topic}: {e} (retrying until the deadline)"),
            None => {}
        }
    }
    out
}

/// Decodes a Confluent-framed `QosWindow` value with the schema in `avro/`.
pub fn decode_qos(value: &[u8]) -> marquee::record::QosWindow {
    let (_, mut payload) = marquee::io::decode::split_frame(value).expect("framed result");
    let schema = apache_avro::Schema::parse_str(marquee::io::sink::QOS_WINDOW_SCHEMA).unwrap();
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .unwrap();
    let v = reader.read_value(&mut payload).expect("QosWindow Avro");
    apache_avro::from_value(&v).expect("QosWindow fields")
}

/// A child process killed when the test ends, even by a panic.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    /// SIGKILL: the process dies without any chance to flush or checkpoint.
    pub fn kill(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }

    /// SIGTERM, and the process must exit cleanly.
    pub fn terminate(&mut self) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let status = self.0.wait().unwrap();
        assert!(
            status.success(),
            "marquee exits cleanly on SIGTERM: {status}"
        );
    }
}

/// Waits until `/readyz` on `http` answers 200.
pub fn wait_ready(http: &str, timeout: Duration) {
    wait_for(&format!("readiness of {http}"), timeout, || {
        (http_get(http, "/readyz").0 == 200).then_some(())
    });
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GETs `path` from `addr` and returns (status, body); status 0 when nothing answers.
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut stream) = TcpStream::connect(addr) else {
        return (0, String::new()); // not listening (yet)
    };
    let mut response = String::new();
    let sent = write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if sent.is_err() || stream.read_to_string(&mut response).is_err() {
        return (0, String::new());
    }
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `topic` holds at least one record (an instance has produced its first output).
pub fn wait_for_first_record(brokers: &str, topic: &str) {
    wait_for(
        &format!("the first record in {topic}"),
        Duration::from_secs(60),
        || {
            // The instance creates its outputs as it starts (slowly on a fresh cluster).
            if !topic_exists(brokers, topic) {
                return None;
            }
            let seen = read_topic(
                brokers,
                topic,
                1,
                Duration::ZERO,
                Duration::from_millis(500),
            );
            (!seen.is_empty()).then_some(())
        },
    );
}

/// Whether the metadata of `topic` lists partitions.
pub fn topic_exists(brokers: &str, topic: &str) -> bool {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("allow.auto.create.topics", "false")
        .create()
        .expect("metadata client");
    consumer
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .ok()
        .and_then(|m| {
            m.topics()
                .first()
                .map(|t| t.error().is_none() && !t.partitions().is_empty())
        })
        .unwrap_or(false)
}

/// Sum of the samples of metric `name` whose labels contain `label` (for example
/// `topic="x"`) in a Prometheus text page.
pub fn metric_sum(page: &str, name: &str, label: &str) -> f64 {
    page.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Polls `check` every 100ms until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An in-process instance running on its own thread until [`Running::stop`].
pub struct Running {
    shutdown: tokio_util::sync::CancellationToken,
    thread: std::thread::JoinHandle<Result<(), marquee::error::PipelineError>>,
}

impl Running {
    /// Starts `topology` against `brokers` and the shared registry, serving HTTP on `http`.
    pub fn start(
        topology: &marquee::config::Topology,
        brokers: &str,
        http: Option<std::net::SocketAddr>,
    ) -> Self {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let endpoints = marquee::app::Endpoints {
            brokers: brokers.to_string(),
            registry: registry().url(),
            http,
            instance_id: None,
        };
        let (topology, stop) = (topology.clone(), shutdown.clone());
        let health = std::sync::Arc::new(marquee::serve::http::Health::default());
        let thread = std::thread::spawn(move || {
            marquee::app::run(&topology, &endpoints, &stop, health, None)
        });
        Self { shutdown, thread }
    }

    /// Stops the instance and asserts it stopped cleanly.
    pub fn stop(self) {
        self.shutdown.cancel();
        self.thread
            .join()
            .unwrap()
            .expect("the instance stops cleanly");
    }
}

/// Waits until `check` passes, for at most `timeout`; fails with its last complaint.
pub fn wait_until_ok(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// Where a spawned instance's log goes: appended to `$MARQUEE_TEST_LOG_DIR/<name>.log` when
/// that is set (to read an instance's own log after a failure), else the test's stderr.
pub fn instance_log(name: &str) -> Stdio {
    let Some(dir) = std::env::var_os("MARQUEE_TEST_LOG_DIR") else {
        return Stdio::inherit();
    };
    std::fs::create_dir_all(&dir).expect("MARQUEE_TEST_LOG_DIR can be created");
    let path = std::path::Path::new(&dir).join(format!("{name}.log"));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
        .into()
}
