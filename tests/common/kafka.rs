//! A real Apache Kafka 4.4 broker (single KRaft node, no ZooKeeper) for tests that need Kafka's
//! own behaviour rather than Tansu's. Its jars come from `scripts/kafka.sh` (Maven Central);
//! the broker runs on free loopback ports out of a fresh temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::Broker;

const VERSION: &str = "4.4.0";
/// Written last by `scripts/kafka.sh`: the libs folder is complete.
const MARKER: &str = ".complete";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Prefix of the broker's temporary directories, followed by the test process id.
const DIR_PREFIX: &str = "marquee-kafka-";
/// A test broker needs a fast start more than peak throughput: C1 only makes it serve about
/// 0.6s sooner (1.7s instead of 2.3s on a 2-core machine); the serial GC runs fewer threads
/// than G1 for such a small heap.
const JVM_FLAGS: &[&str] = &[
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
];

/// The Kafka broker shared by every test in this binary (also sets up test logging).
pub fn kafka() -> &'static Broker {
    super::init_logging();
    static KAFKA: OnceLock<Broker> = OnceLock::new();
    KAFKA.get_or_init(start_kafka)
}

/// Starts a fresh single-node Kafka broker, killed with the test process, and returns once it
/// serves metadata.
pub fn start_kafka() -> Broker {
    let libs = kafka_libs();
    let classpath = format!("{}/*", libs.display());
    remove_stale_dirs();
    // Kept for the broker's whole life: it holds the data and the log. Named after this process
    // so that a later run can remove it (see `remove_stale_dirs`).
    let dir = tempfile::Builder::new()
        .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
        .tempdir()
        .expect("a temporary directory for Kafka")
        .keep();
    let (port, controller_port) = (super::free_port(), super::free_port());
    let properties = dir.join("server.properties");
    std::fs::write(
        &properties,
        server_properties(&dir.join("data"), port, controller_port),
    )
    .expect("write server.properties");
    let log4j = dir.join("log4j2.properties");
    std::fs::write(&log4j, LOG4J2).expect("write log4j2.properties");
    let log4j_flag = format!("-Dlog4j2.configurationFile={}", log4j.display());

    // KRaft needs its metadata log formatted before the first start; `--standalone` makes
    // this node the single voter of a dynamic controller quorum.
    let format = Command::new(java())
        .args(JVM_FLAGS)
        .arg(&log4j_flag)
        .args(["-cp", &classpath, "kafka.tools.StorageTool", "format"])
        // `=`: a random id may start with `-`, which would read as an option.
        .arg(format!("--cluster-id={}", cluster_id()))
        .args(["--standalone", "--config"])
        .arg(&properties)
        .output()
        .unwrap_or_else(|e| panic!("cannot run java to format Kafka's storage: {e}"));
    assert!(
        format.status.success(),
        "formatting Kafka's storage failed ({}):\n{}{}",
        format.status,
        String::from_utf8_lossy(&format.stdout),
        String::from_utf8_lossy(&format.stderr)
    );

    let log_path = dir.join("kafka.log");
    let log = std::fs::File::create(&log_path).expect("create kafka.log");
    let mut command = Command::new(java());
    command
        .args(JVM_FLAGS)
        .arg(&log4j_flag)
        .args(["-cp", &classpath, "kafka.Kafka"])
        .arg(&properties)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("kafka.log handle"))
        .stderr(log);
    let mut child = super::spawn_tied_to_test_process(command)
        .unwrap_or_else(|e| panic!("cannot start java for Kafka: {e}"));

    let addr = format!("127.0.0.1:{port}");
    if let Err(why) = wait_until_serving(&addr, &mut child) {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "Kafka {VERSION} did not serve metadata on {addr}: {why}\n\
             last lines of {}:\n{}",
            log_path.display(),
            tail(&log_path, 40)
        );
    }
    Broker {
        addr,
        _child: child,
    }
}

/// The installed jars, or a panic that says how to install them.
fn kafka_libs() -> PathBuf {
    let home = std::env::var_os("MARQUEE_KAFKA_HOME")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/marquee-kafka").join(VERSION))
        })
        .expect("MARQUEE_KAFKA_HOME or HOME is set");
    let libs = home.join("libs");
    assert!(
        libs.join(MARKER).is_file(),
        "Apache Kafka {VERSION} is needed for this test and is not installed in {}.\n\
         Install it with: bash scripts/kafka.sh (needs java 17+ and mvn)\n\
         (or run `bash .ci/run`, which installs everything the tests need)",
        home.display()
    );
    libs
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|h| PathBuf::from(h).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| "java".into())
}

fn server_properties(data: &Path, port: u16, controller_port: u16) -> String {
    let quorum = format!("controller.quorum.bootstrap.servers=127.0.0.1:{controller_port}");
    node_properties(1, data, port, controller_port, &quorum, 1)
}

/// One node (broker and controller) of a cluster of `replicas` nodes whose controller quorum
/// is `quorum` (a `controller.quorum.*` line).
fn node_properties(
    id: u32,
    data: &Path,
    port: u16,
    controller_port: u16,
    quorum: &str,
    replicas: u32,
) -> String {
    let min_isr = if replicas >= 3 { 2 } else { 1 };
    format!(
        "process.roles=broker,controller
node.id={id}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
{quorum}
log.dirs={data}
num.partitions=1
# Kafka's default, on purpose: Marquee must create its topics with the configured partition
# count even where a metadata request would auto-create them with num.partitions.
auto.create.topics.enable=true
default.replication.factor={replicas}
min.insync.replicas={min_isr}
offsets.topic.replication.factor={replicas}
transaction.state.log.replication.factor={replicas}
transaction.state.log.min.isr={min_isr}
share.coordinator.state.topic.replication.factor={replicas}
share.coordinator.state.topic.min.isr={min_isr}
# Consumer groups form at once instead of waiting 3s for more members.
group.initial.rebalance.delay.ms=0
",
        data = data.display()
    )
}

/// Everything at WARN to stdout (the broker's kafka.log), plus the line that says it started.
const LOG4J2: &str = "\
appender.out.type=Console
appender.out.name=out
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=WARN
rootLogger.appenderRef.out.ref=out
logger.started.name=kafka.server.KafkaRaftServer
logger.started.level=INFO
";

/// A random cluster id in Kafka's format: 16 bytes, URL-safe base64 without padding.
fn cluster_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let bits = rand::random::<u128>();
    // 21 characters of 6 bits, then the last 2 bits padded with zeros, as base64 does.
    (0..22)
        .map(|i| match i {
            21 => (bits & 3) << 4,
            _ => (bits >> (122 - 6 * i)) & 63,
        })
        .map(|v| ALPHABET[v as usize] as char)
        .collect()
}

/// Waits until the broker answers a metadata request listing itself, or fails early if the
/// JVM exits.
fn wait_until_serving(addr: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let exited = |child: &mut Child| match child.try_wait() {
        Ok(Some(status)) => Err(format!("the broker exited: {status}")),
        _ => Ok(()),
    };
    // Connecting first keeps librdkafka from logging refused connections while the JVM boots.
    while std::net::TcpStream::connect(addr).is_err() {
        exited(child)?;
        if Instant::now() > deadline {
            return Err(format!("nothing listened within {STARTUP_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", addr)
        // Retry quickly rather than back off up to librdkafka's 10s default.
        .set("reconnect.backoff.max.ms", "250")
        .create()
        .map_err(|e| format!("metadata client: {e}"))?;
    loop {
        exited(child)?;
        let why = match client.fetch_metadata(None, Duration::from_secs(2)) {
            Ok(metadata) if !metadata.brokers().is_empty() => return Ok(()),
            Ok(_) => "no broker in the metadata".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!("after {STARTUP_TIMEOUT:?}: {why}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `lines` lines of `path`.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Removes the directories of earlier test processes that have exited (their broker died with
/// them), since each broker's directory has to outlive every static destructor.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A three-node Apache Kafka cluster (each node a broker and a KRaft controller; replication
/// factor 3, `min.insync.replicas=2`) for fault tests: a node can be stopped and started
/// again on the same ports and data.
pub struct Cluster {
    /// Bootstrap servers of all three nodes.
    pub bootstrap: String,
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Cluster {
    /// Starts three fresh nodes and returns once every one serves metadata.
    pub fn start() -> Cluster {
        super::init_logging();
        let libs = kafka_libs();
        remove_stale_dirs();
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| (super::free_port(), super::free_port()))
            .collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let quorum = format!("controller.quorum.voters={voters}");
        let id = cluster_id();
        let mut nodes = Vec::new();
        for (i, (port, controller)) in ports.iter().enumerate() {
            let dir = tempfile::Builder::new()
                .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
                .tempdir()
                .expect("a temporary directory for a Kafka node")
                .keep();
            let properties = node_properties(
                i as u32 + 1,
                &dir.join("data"),
                *port,
                *controller,
                &quorum,
                3,
            );
            std::fs::write(dir.join("server.properties"), properties)
                .expect("write server.properties");
            std::fs::write(dir.join("log4j2.properties"), LOG4J2).expect("write log4j2.properties");
            let format = Command::new(java())
                .args(JVM_FLAGS)
                .arg(format!(
                    "-Dlog4j2.configurationFile={}",
                    dir.join("log4j2.properties").display()
                ))
                .args([
                    "-cp",
                    &format!("{}/*", libs.display()),
                    "kafka.tools.StorageTool",
                    "format",
                ])
                .arg(format!("--cluster-id={id}"))
                .arg("--config")
                .arg(dir.join("server.properties"))
                .output()
                .unwrap_or_else(|e| panic!("cannot run java to format Kafka's storage: {e}"));
            assert!(
                format.status.success(),
                "formatting node {}'s storage failed: {}",
                i + 1,
                String::from_utf8_lossy(&format.stderr)
            );
            nodes.push(Node {
                port: *port,
                dir,
                child: None,
            });
        }
        let bootstrap = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster { bootstrap, nodes };
        // The controllers need a quorum: start all three before waiting for any.
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let libs = kafka_libs();
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("kafka.log"))
            .expect("open kafka.log");
        let mut command = Command::new(java());
        command
            .args(JVM_FLAGS)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                node.dir.join("log4j2.properties").display()
            ))
            .args(["-cp", &format!("{}/*", libs.display()), "kafka.Kafka"])
            .arg(node.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("kafka.log handle"))
            .stderr(log);
        node.child = Some(
            super::spawn_tied_to_test_process(command)
                .unwrap_or_else(|e| panic!("cannot start java for Kafka: {e}")),
        );
    }

    fn wait(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let addr = format!("127.0.0.1:{}", node.port);
        let child = node.child.as_mut().expect("the node was started");
        if let Err(why) = wait_until_serving(&addr, child) {
            panic!(
                "Kafka node {} did not serve metadata on {addr}: {why}\nlast lines of its log:\n{}",
                i + 1,
                tail(&node.dir.join("kafka.log"), 40)
            );
        }
    }

    /// The index (0..3) of the node that leads `partition` of `topic`.
    pub fn leader(&self, topic: &str, partition: i32) -> usize {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .expect("metadata client");
        let metadata = client
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("topic metadata");
        let leader = metadata.topics()[0]
            .partitions()
            .iter()
            .find(|p| p.id() == partition)
            .expect("the partition exists")
            .leader();
        (leader - 1) as usize
    }

    /// Kills node `i` (SIGKILL: a crash, not a clean shutdown).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `i` again on its ports and data, and waits until it serves.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
