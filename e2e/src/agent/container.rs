//! One container of a pod: start its process the way a kubelet starts a container
//! (image → executable, env, mounts in a private mount namespace, user, working dir),
//! run its probes, restart it per `restartPolicy` with the kubelet's back-off, and stop
//! it with SIGTERM, the grace period and SIGKILL.

use std::ffi::CString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, Pod, Probe, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::spec::{self, ImageMap, ObjectCache, Waiting};
use super::{AgentConfig, now};

/// Everything a container needs from its pod.
pub struct PodContext {
    pub cfg: Arc<AgentConfig>,
    pub client: kube::Client,
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub ip: String,
    /// The pod as last seen (status.podIP filled in by the worker).
    pub pod: watch::Receiver<Pod>,
    /// Host folder of each volume, by volume name.
    pub volume_dirs: std::collections::BTreeMap<String, PathBuf>,
    /// The pod's resolv.conf, mounted read-only on /etc/resolv.conf (see
    /// `spec::resolv_conf`); `None`: the host's.
    pub resolv_conf: Option<PathBuf>,
}

/// Stop request: `Some(grace)` once the container must stop.
pub type StopRx = watch::Receiver<Option<Duration>>;

const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

pub struct Runner {
    pub ctx: Arc<PodContext>,
    pub container: Container,
    pub status: watch::Sender<ContainerStatus>,
    pub changed: mpsc::Sender<()>,
    pub stop: StopRx,
}

enum Exit {
    /// The process ended by itself (or by a liveness kill) with this record.
    Ended(ContainerStateTerminated),
    /// The pod is stopping; the process has been stopped.
    Stopped,
}

impl Runner {
    fn update(&self, f: impl FnOnce(&mut ContainerStatus)) {
        self.status.send_modify(f);
        let _ = self.changed.try_send(());
    }

    fn set_waiting(&self, w: &Waiting) {
        self.update(|s| {
            s.state = Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(w.reason.to_string()),
                    message: Some(w.message.clone()),
                }),
                ..Default::default()
            });
            s.ready = false;
            s.started = Some(false);
        });
    }

    fn stopping(&self) -> bool {
        self.stop.borrow().is_some()
    }

    /// Waits `d`, or less if the pod starts stopping. True when it is stopping.
    async fn sleep_or_stop(&mut self, d: Duration) -> bool {
        if self.stopping() {
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => false,
            _ = self.stop.wait_for(|s| s.is_some()) => true,
        }
    }

    pub async fn run(mut self) {
        let restart_policy = self
            .ctx
            .pod
            .borrow()
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into());
        let mut backoff = BACKOFF_START;
        let mut pull_backoff = Duration::from_secs(1);
        loop {
            if self.stopping() {
                return;
            }
            let prepared = match self.prepare().await {
                Ok(p) => p,
                Err(w) => {
                    warn!(pod = %self.ctx.name, container = %self.container.name, reason = w.reason, "{}", w.message);
                    let back = if w.reason == "ErrImagePull" {
                        let d = pull_backoff;
                        pull_backoff = (pull_backoff * 2).min(BACKOFF_MAX);
                        d
                    } else {
                        Duration::from_secs(2)
                    };
                    self.set_waiting(&w);
                    if self.sleep_or_stop(back).await {
                        return;
                    }
                    if w.reason == "ErrImagePull" {
                        self.set_waiting(&Waiting::new(
                            "ImagePullBackOff",
                            format!(
                                "Back-off pulling image {:?}: {}",
                                self.container.image.as_deref().unwrap_or(""),
                                w.message
                            ),
                        ));
                    }
                    continue;
                }
            };
            let started = Instant::now();
            let exit = match self.run_once(prepared).await {
                Ok(e) => e,
                Err(w) => {
                    self.set_waiting(&w);
                    if self.sleep_or_stop(Duration::from_secs(2)).await {
                        return;
                    }
                    continue;
                }
            };
            let term = match exit {
                Exit::Stopped => return,
                Exit::Ended(t) => t,
            };
            let code = term.exit_code;
            let restart = match restart_policy.as_str() {
                "Never" => false,
                "OnFailure" => code != 0,
                _ => true,
            };
            if !restart {
                return;
            }
            if started.elapsed() >= BACKOFF_RESET_AFTER {
                backoff = BACKOFF_START;
            }
            let wait = backoff;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            let msg = format!(
                "back-off {}s restarting failed container={} pod={}_{}({})",
                wait.as_secs(),
                self.container.name,
                self.ctx.name,
                self.ctx.namespace,
                self.ctx.uid
            );
            self.update(|s| {
                s.last_state = Some(ContainerState {
                    terminated: Some(term),
                    ..Default::default()
                });
                s.state = Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some("CrashLoopBackOff".into()),
                        message: Some(msg),
                    }),
                    ..Default::default()
                });
                s.ready = false;
                s.started = Some(false);
            });
            if self.sleep_or_stop(wait).await {
                return;
            }
            self.update(|s| s.restart_count += 1);
        }
    }

    /// Resolves the image and builds the command, or says why the container waits.
    async fn prepare(&self) -> Result<tokio::process::Command, Waiting> {
        let image = self.container.image.clone().unwrap_or_default();
        let map =
            ImageMap::load(&self.ctx.cfg.images).map_err(|e| Waiting::new("ErrImagePull", e))?;
        let exe = map.resolve(&image).map(Path::to_path_buf).ok_or_else(|| {
            Waiting::new(
                "ErrImagePull",
                format!(
                    "image {image:?} has no mapping to a local executable in {}",
                    self.ctx.cfg.images.display()
                ),
            )
        })?;
        if !exe.is_file() {
            return Err(Waiting::new(
                "ErrImagePull",
                format!(
                    "image {image:?} maps to {}, which does not exist",
                    exe.display()
                ),
            ));
        }
        let exe = pull(&exe, &self.ctx.cfg.state_dir.join("images")).map_err(|e| {
            Waiting::new(
                "ErrImagePull",
                format!("pulling {image:?} from {}: {e}", exe.display()),
            )
        })?;
        let pod = self.ctx.pod.borrow().clone();
        let objects = fetch_objects(&self.ctx.client, &self.ctx.namespace, &pod).await?;
        let env = spec::container_env(
            &pod,
            &self.container,
            &objects,
            &self.ctx.cfg.base_env(&pod),
        )?;
        let argv = spec::container_argv(&self.container, &env);
        let sandbox = self.sandbox(&pod)?;

        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(&argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOSTNAME", &self.ctx.name)
            .envs(env)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(arg0) = self.container.command.as_ref().and_then(|c| c.first()) {
            cmd.arg0(arg0);
        }
        // SAFETY: the closure only makes async-signal-safe system calls on memory
        // prepared before fork.
        unsafe {
            cmd.pre_exec(move || sandbox.enter());
        }
        Ok(cmd)
    }

    fn sandbox(&self, pod: &Pod) -> Result<Sandbox, Waiting> {
        let err = |m: String| Waiting::new("CreateContainerConfigError", m);
        let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
        let csc = self.container.security_context.as_ref();
        let uid = csc
            .and_then(|c| c.run_as_user)
            .or(psc.and_then(|p| p.run_as_user));
        let gid = csc
            .and_then(|c| c.run_as_group)
            .or(psc.and_then(|p| p.run_as_group));
        let non_root = csc
            .and_then(|c| c.run_as_non_root)
            .or(psc.and_then(|p| p.run_as_non_root));
        if non_root == Some(true) && uid.unwrap_or(0) == 0 {
            return Err(err(
                "container has runAsNonRoot and image will run as root (set runAsUser)".into(),
            ));
        }
        let ro_root = csc
            .and_then(|c| c.read_only_root_filesystem)
            .unwrap_or(false);
        let mut mounts = Vec::new();
        for m in self.container.volume_mounts.iter().flatten() {
            let Some(dir) = self.ctx.volume_dirs.get(&m.name) else {
                return Err(err(format!(
                    "volume mount {:?}: no volume of that name",
                    m.name
                )));
            };
            let src = match m.sub_path.as_deref() {
                Some(s) if !s.is_empty() => dir.join(s),
                _ => dir.clone(),
            };
            let dst = PathBuf::from(&m.mount_path);
            if src.is_dir() {
                std::fs::create_dir_all(&dst)
            } else {
                dst.parent()
                    .map(std::fs::create_dir_all)
                    .unwrap_or(Ok(()))
                    .and_then(|_| {
                        if dst.exists() {
                            Ok(())
                        } else {
                            std::fs::File::create(&dst).map(|_| ())
                        }
                    })
            }
            .map_err(|e| err(format!("creating mount point {}: {e}", dst.display())))?;
            mounts.push((src, dst, m.read_only.unwrap_or(false)));
        }
        if let Some(r) = &self.ctx.resolv_conf {
            mounts.push((r.clone(), PathBuf::from("/etc/resolv.conf"), true));
        }
        // Outer mounts first; a mount point inside another volume (rules/ inside a
        // config volume) must exist in that volume's folder, as the kubelet makes it.
        mounts.sort_by_key(|(_, dst, _)| dst.components().count());
        for j in 0..mounts.len() {
            for i in 0..j {
                let (outer_src, outer_dst) = (&mounts[i].0, &mounts[i].1);
                if let Ok(rel) = mounts[j].1.strip_prefix(outer_dst)
                    && outer_src.is_dir()
                {
                    let point = outer_src.join(rel);
                    let made = if mounts[j].0.is_dir() {
                        std::fs::create_dir_all(&point)
                    } else {
                        point
                            .parent()
                            .map(std::fs::create_dir_all)
                            .unwrap_or(Ok(()))
                            .and_then(|_| {
                                std::fs::OpenOptions::new()
                                    .create(true)
                                    .append(true)
                                    .open(&point)
                                    .map(|_| ())
                            })
                    };
                    made.map_err(|e| {
                        err(format!("creating mount point {}: {e}", point.display()))
                    })?;
                }
            }
        }
        let mounts = mounts
            .iter()
            .map(|(src, dst, ro)| Ok((cstring(src)?, cstring(dst)?, *ro)))
            .collect::<Result<Vec<_>, Waiting>>()?;
        let cwd = match self.container.working_dir.as_deref() {
            Some(d) if !d.is_empty() => Some(cstring(Path::new(d))?),
            _ => None,
        };
        Ok(Sandbox {
            mounts,
            ro_root,
            uid: uid.map(|u| u as libc::uid_t),
            gid: gid.or(uid).map(|g| g as libc::gid_t),
            cwd,
        })
    }

    fn log_path(&self) -> PathBuf {
        self.ctx.cfg.log_dir.join(format!(
            "{}_{}_{}.log",
            self.ctx.namespace, self.ctx.name, self.container.name
        ))
    }

    async fn run_once(&mut self, mut cmd: tokio::process::Command) -> Result<Exit, Waiting> {
        let log_path = self.log_path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| {
                Waiting::new(
                    "RunContainerError",
                    format!("opening log {}: {e}", log_path.display()),
                )
            })?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let log2 = log
            .try_clone()
            .map_err(|e| Waiting::new("RunContainerError", e.to_string()))?;
        cmd.stdout(log).stderr(log2);
        let mut child = cmd.spawn().map_err(|e| {
            Waiting::new(
                "RunContainerError",
                format!("starting container process: {e}"),
            )
        })?;
        let pid = child.id().unwrap_or(0) as i32;
        let started_at = now();
        info!(pod = %self.ctx.name, container = %self.container.name, pid, "container started");
        let has_startup = self.container.startup_probe.is_some();
        self.update(|s| {
            s.state = Some(ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started_at.clone()),
                }),
                ..Default::default()
            });
            s.started = Some(!has_startup);
            s.ready = false;
            s.container_id = Some(format!("snooze://{pid}"));
        });

        let probes = self.probes();
        tokio::pin!(probes);
        let mut stop = self.stop.clone();
        let status = tokio::select! {
            st = child.wait() => st,
            reason = &mut probes => {
                warn!(pod = %self.ctx.name, container = %self.container.name, reason, "probe failed, killing container");
                let grace = self.grace();
                terminate(&mut child, pid, grace).await
            }
            g = async { stop.wait_for(|s| s.is_some()).await.ok().and_then(|g| *g) } => {
                let grace = g.unwrap_or_default();
                let st = terminate(&mut child, pid, grace).await;
                let term = terminated(st, started_at, &log_path, log_start);
                self.update(|s| {
                    s.state = Some(ContainerState { terminated: Some(term), ..Default::default() });
                    s.ready = false;
                    s.started = Some(false);
                });
                return Ok(Exit::Stopped);
            }
        };
        let term = terminated(status, started_at, &log_path, log_start);
        info!(pod = %self.ctx.name, container = %self.container.name, code = term.exit_code, "container exited");
        let t2 = term.clone();
        self.update(|s| {
            s.state = Some(ContainerState {
                terminated: Some(t2),
                ..Default::default()
            });
            s.ready = false;
            s.started = Some(false);
        });
        Ok(Exit::Ended(term))
    }

    fn grace(&self) -> Duration {
        let pod = self.ctx.pod.borrow();
        Duration::from_secs(
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0) as u64,
        )
    }

    /// Runs the startup, readiness and liveness probes; resolves only when the
    /// container must be killed (startup or liveness failure), with the reason.
    async fn probes(&self) -> String {
        let ip = self.ctx.ip.clone();
        if let Some(p) = &self.container.startup_probe {
            if let Err(e) = probe_until(p, &ip, &self.container, true).await {
                return format!("startup probe failed: {e}");
            }
            self.update(|s| s.started = Some(true));
        }
        let readiness = async {
            match &self.container.readiness_probe {
                None => {
                    self.update(|s| s.ready = true);
                    std::future::pending::<std::convert::Infallible>().await
                }
                Some(p) => {
                    let mut state = ProbeState::new(p);
                    tokio::time::sleep(state.initial_delay).await;
                    loop {
                        let ok = probe_once(p, &ip, &self.container).await;
                        if let Some(ready) = state.observe(ok.is_ok()) {
                            if let Err(e) = &ok {
                                info!(pod = %self.ctx.name, container = %self.container.name, "readiness probe failed: {e}");
                            }
                            self.update(|s| s.ready = ready);
                        }
                        tokio::time::sleep(state.period).await;
                    }
                }
            }
        };
        let liveness = async {
            match &self.container.liveness_probe {
                None => std::future::pending::<String>().await,
                Some(p) => match probe_until(p, &ip, &self.container, false).await {
                    Err(e) => format!("liveness probe failed: {e}"),
                    Ok(()) => std::future::pending::<String>().await,
                },
            }
        };
        tokio::select! {
            never = readiness => match never {},
            r = liveness => r,
        }
    }
}

/// "Pulls" an executable into the node's image store, as a runtime unpacks an image
/// into its own storage: a snapshot keyed by path, size and mtime (a rebuild is a new
/// image; running containers keep theirs), readable and executable by any user the
/// container runs as, wherever the build output lives (e.g. under a 0700 home).
fn pull(exe: &Path, store: &Path) -> std::io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(exe)?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    exe.hash(&mut h);
    meta.len().hash(&mut h);
    meta.modified()?.hash(&mut h);
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dest = store.join(format!("{name}-{:016x}", h.finish()));
    if dest.is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(store)?;
    std::fs::set_permissions(store, std::fs::Permissions::from_mode(0o755))?;
    let tmp = store.join(format!(".{name}.{}.tmp", std::process::id()));
    std::fs::copy(exe, &tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, &dest)?;
    Ok(dest)
}

fn cstring(p: &Path) -> Result<CString, Waiting> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| {
        Waiting::new(
            "CreateContainerConfigError",
            format!("path with NUL: {}", p.display()),
        )
    })
}

/// The process's view of the pod: mounts in a private mount namespace, a read-only
/// root when asked, the working dir, and the user.
struct Sandbox {
    mounts: Vec<(CString, CString, bool)>,
    ro_root: bool,
    uid: Option<libc::uid_t>,
    gid: Option<libc::gid_t>,
    cwd: Option<CString>,
}

impl Sandbox {
    /// Runs in the child between fork and exec.
    fn enter(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| {
            if r != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: plain system calls on NUL-terminated strings owned by self.
        unsafe {
            if !self.mounts.is_empty() || self.ro_root {
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                if self.ro_root {
                    check(libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                        std::ptr::null(),
                    ))?;
                }
                for (src, dst, ro) in &self.mounts {
                    check(libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    ))?;
                    if *ro {
                        check(libc::mount(
                            std::ptr::null(),
                            dst.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                            std::ptr::null(),
                        ))?;
                    }
                }
            }
            if let Some(cwd) = &self.cwd {
                check(libc::chdir(cwd.as_ptr()))?;
            }
            if let Some(g) = self.gid {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setgid(g))?;
            }
            if let Some(u) = self.uid {
                check(libc::setuid(u))?;
            }
        }
        Ok(())
    }
}

/// SIGTERM to the container's process group, SIGKILL after `grace`.
async fn terminate(
    child: &mut tokio::process::Child,
    pgid: i32,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    if pgid > 0 {
        // SAFETY: signalling a process group we created.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(st) => {
            if pgid > 0 {
                // Leftovers of the group do not outlive the container.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            st
        }
        Err(_) => {
            if pgid > 0 {
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
            child.wait().await
        }
    }
}

/// The terminated record of an exit: code, signal, reason, and for a failure the
/// end of what the process wrote (like `terminationMessagePolicy:
/// FallbackToLogsOnError`).
fn terminated(
    st: std::io::Result<std::process::ExitStatus>,
    started_at: Time,
    log: &Path,
    log_start: u64,
) -> ContainerStateTerminated {
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match &st {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(c), _) => (c, None),
            (None, Some(sig)) => (128 + sig, Some(sig)),
            _ => (1, None),
        },
        Err(_) => (1, None),
    };
    let message = if code != 0 {
        tail(log, log_start, 2048).filter(|m| !m.is_empty())
    } else {
        None
    };
    ContainerStateTerminated {
        exit_code: code,
        signal,
        reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
        message,
        started_at: Some(started_at),
        finished_at: Some(now()),
        container_id: None,
    }
}

fn tail(path: &Path, from: u64, max: u64) -> Option<String> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = from.max(len.saturating_sub(max));
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).trim().to_string())
}

pub async fn fetch_objects(
    client: &kube::Client,
    ns: &str,
    pod: &Pod,
) -> Result<ObjectCache, Waiting> {
    let (cms, secrets) = spec::referenced_objects(pod);
    let mut cache = ObjectCache::default();
    let cm_api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for name in cms {
        match cm_api.get_opt(&name).await {
            Ok(Some(cm)) => {
                cache.config_maps.insert(name, cm);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!("reading configmap {name}: {e}"),
                ));
            }
        }
    }
    let s_api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in secrets {
        match s_api.get_opt(&name).await {
            Ok(Some(s)) => {
                cache.secrets.insert(name, s);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Waiting::new(
                    "CreateContainerConfigError",
                    format!("reading secret {name}: {e}"),
                ));
            }
        }
    }
    Ok(cache)
}

/// Success/failure counting of one probe, with its thresholds.
struct ProbeState {
    initial_delay: Duration,
    period: Duration,
    success_threshold: i32,
    failure_threshold: i32,
    successes: i32,
    failures: i32,
    result: Option<bool>,
}

impl ProbeState {
    fn new(p: &Probe) -> Self {
        Self {
            initial_delay: Duration::from_secs(p.initial_delay_seconds.unwrap_or(0).max(0) as u64),
            period: Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64),
            success_threshold: p.success_threshold.unwrap_or(1).max(1),
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1),
            successes: 0,
            failures: 0,
            result: None,
        }
    }

    /// Counts one result; returns the new overall result when it changes.
    fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.successes += 1;
            self.failures = 0;
        } else {
            self.failures += 1;
            self.successes = 0;
        }
        let next = if self.successes >= self.success_threshold {
            Some(true)
        } else if self.failures >= self.failure_threshold {
            Some(false)
        } else {
            self.result
        };
        if next != self.result && next.is_some() {
            self.result = next;
            return next;
        }
        None
    }
}

/// Probes until the result is decided: with `until_success`, Ok on the first
/// success (startup probe) and Err after `failureThreshold` failures in a row;
/// otherwise (liveness) it only returns on failure.
async fn probe_until(
    p: &Probe,
    ip: &str,
    c: &Container,
    until_success: bool,
) -> Result<(), String> {
    let mut state = ProbeState::new(p);
    tokio::time::sleep(state.initial_delay).await;
    loop {
        let r = probe_once(p, ip, c).await;
        match state.observe(r.is_ok()) {
            Some(true) if until_success => return Ok(()),
            Some(false) => return Err(r.err().unwrap_or_default()),
            _ => {}
        }
        tokio::time::sleep(state.period).await;
    }
}

fn resolve_port(port: &IntOrString, c: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("no container port named {name:?}")),
    }
}

/// One probe attempt with the probe's timeout: an HTTP GET answered 200–399, a TCP
/// connection accepted, or a command that exits 0.
async fn probe_once(p: &Probe, pod_ip: &str, c: &Container) -> Result<(), String> {
    let timeout = Duration::from_secs(p.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(h) = &p.http_get {
            let port = resolve_port(&h.port, c)?;
            let host = h.host.clone().unwrap_or_else(|| pod_ip.to_string());
            if h.scheme
                .as_deref()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"))
            {
                return Err("HTTPS probes are not supported by the snooze node agent".into());
            }
            let mut s = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| {
                    format!(
                        "Get \"http://{host}:{port}{}\": {e}",
                        h.path.as_deref().unwrap_or("/")
                    )
                })?;
            let mut req = format!(
                "GET {} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n",
                h.path.as_deref().unwrap_or("/")
            );
            for hh in h.http_headers.iter().flatten() {
                req.push_str(&format!("{}: {}\r\n", hh.name, hh.value));
            }
            req.push_str("\r\n");
            s.write_all(req.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&buf[..n]);
            let code: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| format!("malformed HTTP response {line:?}"))?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(t) = &p.tcp_socket {
            let port = resolve_port(&t.port, c)?;
            let host = t.host.clone().unwrap_or_else(|| pod_ip.to_string());
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if let Some(e) = &p.exec {
            // Run on the node, as the container's command would see it in part: the
            // default PATH, the pod's address in POD_IP and the container's literal
            // env values (not those from fields, ConfigMaps or Secrets).
            let argv = e.command.clone().unwrap_or_default();
            let (cmd, args) = argv.split_first().ok_or("exec probe without a command")?;
            let mut command = tokio::process::Command::new(cmd);
            command
                .args(args)
                .env_clear()
                .env(
                    "PATH",
                    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                )
                .env("POD_IP", pod_ip)
                .stdin(Stdio::null())
                .kill_on_drop(true);
            for v in c.env.iter().flatten() {
                if let Some(value) = &v.value {
                    command.env(&v.name, value);
                }
            }
            let out = command
                .output()
                .await
                .map_err(|e| format!("exec probe {cmd}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "exec probe {cmd} failed ({}): {}{}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout).trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        } else {
            Err(
                "only httpGet, tcpSocket and exec probes are supported by the snooze node agent"
                    .into(),
            )
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {}s", timeout.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_thresholds() {
        let p = Probe {
            success_threshold: Some(2),
            failure_threshold: Some(2),
            ..Default::default()
        };
        let mut s = ProbeState::new(&p);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(true), Some(true));
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(true), None);
        assert_eq!(s.observe(false), None);
        assert_eq!(s.observe(false), Some(false));
    }
}
