//! An etcd cluster of Debian's `etcd-server` on loopback ports, for the replicated store's tests:
//! members can be stopped (SIGKILL) and started again on their data.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::{free_port, program, wait_until, ChildGuard};

/// One member's addresses and process.
#[derive(Debug)]
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    process: Option<ChildGuard>,
}

/// A running cluster; every member is killed on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Start `size` members in `dir` and wait until the cluster answers.
    pub fn start(dir: &Path, size: usize) -> Self {
        std::fs::create_dir_all(dir).expect("create the etcd directory");
        // `free_port` releases its port, so two calls may return the same one: keep them apart.
        let mut taken = std::collections::BTreeSet::new();
        let mut port = || loop {
            let port = free_port();
            if taken.insert(port) {
                return SocketAddr::from(([127, 0, 0, 1], port));
            }
        };
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client: port(),
                peer: port(),
                process: None,
            })
            .collect();
        let mut cluster = Self {
            dir: dir.to_owned(),
            token: format!("dstack-mesh-test-{}-{}", std::process::id(), free_port()),
            members,
        };
        for i in 0..size {
            cluster.start_member(i);
        }
        cluster.wait_healthy(&(0..size).collect::<Vec<_>>());
        cluster
    }

    /// The client URLs, one per member (stopped ones included, as a client is configured).
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect()
    }

    /// Kill member `i` (SIGKILL, as a crash).
    pub fn stop_member(&mut self, i: usize) {
        self.members[i].process = None;
    }

    /// Start member `i` on its data directory (a first start creates the cluster).
    pub fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let mut cmd = Command::new(program("etcd"));
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .arg("--listen-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg("new")
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let guard = ChildGuard::spawn(&format!("etcd-{}", m.name), cmd, &self.dir)
            .expect("start etcd (scripts/setup-test-deps installs etcd-server)");
        self.members[i].process = Some(guard);
    }

    /// Wait until members `which` answer `endpoint health`.
    pub fn wait_healthy(&mut self, which: &[usize]) {
        let endpoints: Vec<String> = which
            .iter()
            .map(|&i| format!("http://{}", self.members[i].client))
            .collect();
        wait_until("etcd to be healthy", Duration::from_secs(60), || {
            for &i in which {
                if let Some(p) = self.members[i].process.as_mut() {
                    assert!(p.exited().is_none(), "etcd m{i} exited: {}", p.stderr());
                }
            }
            self.etcdctl_at(&endpoints, &["endpoint", "health"])
                .status
                .success()
        });
    }

    /// `etcdctl` against every member.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        self.etcdctl_at(&self.endpoints(), args)
    }

    /// The running members' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter_map(|m| m.process.as_ref().map(ChildGuard::id))
            .collect()
    }

    /// Each member's client address (`/metrics` is served there).
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }

    /// `etcdctl put key` with `value` on its standard input (any bytes).
    pub fn etcdctl_put(&self, key: &str, value: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(program("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg("--command-timeout=5s")
            .args(["put", key])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run etcdctl");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(value).expect("write to etcdctl");
        }
        child.wait_with_output().expect("etcdctl put")
    }

    fn etcdctl_at(&self, endpoints: &[String], args: &[&str]) -> Output {
        Command::new(program("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .arg("--command-timeout=5s")
            .args(args)
            .output()
            .expect("run etcdctl")
    }
}
