//! One pod bound to this node: its IP, its volumes, its containers, its status, and its
//! deletion the way a kubelet deletes a pod.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP,
    ServiceAccount,
};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, ResourceExt};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::container::{PodContext, Runner};
use super::spec::{self, VolumeSource};
use super::{AgentConfig, IpPool, now};

pub struct PodWorker {
    pub cfg: Arc<AgentConfig>,
    pub client: kube::Client,
    pub pool: Arc<IpPool>,
    /// The pod as the API server has it; `None` once it is gone from the API.
    pub rx: watch::Receiver<Option<Pod>>,
}

fn waiting(reason: &str, message: Option<String>) -> Option<ContainerState> {
    Some(ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    })
}

impl PodWorker {
    pub async fn run(mut self) {
        let Some(pod) = self.rx.borrow().clone() else {
            return;
        };
        let uid = pod.uid().unwrap_or_default();
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);

        // A pod that is already terminal is left alone (as after a kubelet restart).
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            self.wait_and_finish(&api, &name, &uid, &pod).await;
            return;
        }

        let ip = self.pool.allocate(&uid);
        let pod_dir = self.cfg.state_dir.join("pods").join(&uid);
        let start_time = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .unwrap_or_else(now);
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.clone())
            .unwrap_or_default();

        // Until the sandbox is set up, every container is ContainerCreating.
        let initial: Vec<ContainerStatus> = containers
            .iter()
            .map(|c| ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                image_id: String::new(),
                ready: false,
                started: Some(false),
                restart_count: 0,
                state: waiting("ContainerCreating", None),
                ..Default::default()
            })
            .collect();
        let mut writer = StatusWriter {
            api: api.clone(),
            name: name.clone(),
            host_ip: self.cfg.node_ip.clone(),
            pod_ip: ip.clone(),
            start_time,
            last: None,
            last_sent: None,
            terminal_on_exit: pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.as_deref())
                .is_some_and(|p| p != "Always"),
        };
        writer.write(&initial).await;

        let mut with_ip = pod.clone();
        let st = with_ip.status.get_or_insert_with(Default::default);
        st.pod_ip = Some(ip.clone());
        st.pod_ips = Some(vec![PodIP { ip: ip.clone() }]);
        st.host_ip = Some(self.cfg.node_ip.clone());

        // Volumes (retried while a ConfigMap/Secret is missing or the token fails).
        let volume_dirs = loop {
            if self
                .rx
                .borrow()
                .as_ref()
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            {
                break None;
            }
            match self.setup_volumes(&with_ip, &pod_dir).await {
                Ok(d) => break Some(d),
                Err(w) => {
                    warn!(pod = %name, "volumes: {}", w.message);
                    let st: Vec<ContainerStatus> = initial
                        .iter()
                        .cloned()
                        .map(|mut c| {
                            c.state = waiting(w.reason, Some(w.message.clone()));
                            c
                        })
                        .collect();
                    writer.write(&st).await;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        _ = self.rx.changed() => {}
                    }
                }
            }
        };

        let mut statuses = Vec::new();
        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        let resolv_conf = spec::resolv_conf(
            &with_ip,
            self.cfg.cluster_dns.as_deref(),
            &self.cfg.cluster_domain,
        )
        .and_then(|text| {
            let path = pod_dir.join("resolv.conf");
            match std::fs::write(&path, text) {
                Ok(()) => Some(path),
                Err(e) => {
                    warn!(pod = %name, "writing resolv.conf: {e}; the pod gets the host's");
                    None
                }
            }
        });
        if let Some(volume_dirs) = volume_dirs {
            let (pod_tx, pod_rx) = watch::channel(with_ip.clone());
            let ctx = Arc::new(PodContext {
                cfg: self.cfg.clone(),
                client: self.client.clone(),
                uid: uid.clone(),
                namespace: ns.clone(),
                name: name.clone(),
                ip: ip.clone(),
                pod: pod_rx,
                volume_dirs,
                resolv_conf,
            });
            let (changed_tx, mut changed_rx) = mpsc::channel::<()>(1);
            for (c, init) in containers.iter().zip(initial.iter()) {
                let (status_tx, status_rx) = watch::channel(init.clone());
                let (stop_tx, stop_rx) = watch::channel(None);
                statuses.push(status_rx);
                stops.push(stop_tx);
                let runner = Runner {
                    ctx: ctx.clone(),
                    container: c.clone(),
                    status: status_tx,
                    changed: changed_tx.clone(),
                    stop: stop_rx,
                };
                tasks.push(tokio::spawn(runner.run()));
            }
            drop(changed_tx);

            let token_refresh = self.token_refresh_interval(&with_ip);
            let mut refresh = tokio::time::interval_at(
                tokio::time::Instant::now() + token_refresh,
                token_refresh,
            );
            // Run until the pod is being deleted or is gone.
            loop {
                let current: Vec<ContainerStatus> =
                    statuses.iter().map(|s| s.borrow().clone()).collect();
                let written = writer.write(&current).await;
                if writer.terminal() {
                    break;
                }
                tokio::select! {
                    c = changed_rx.recv() => { if c.is_none() { break; } }
                    r = self.rx.changed() => {
                        if r.is_err() { break; }
                        match self.rx.borrow().clone() {
                            None => break,
                            Some(p) if p.metadata.deletion_timestamp.is_some() => break,
                            Some(mut p) => {
                                let st = p.status.get_or_insert_with(Default::default);
                                st.pod_ip = Some(ip.clone());
                                st.host_ip = Some(self.cfg.node_ip.clone());
                                let _ = pod_tx.send(p);
                            }
                        }
                    }
                    _ = refresh.tick() => {
                        if let Err(e) = self.setup_volumes(&with_ip, &pod_dir).await {
                            warn!(pod = %name, "refreshing volumes: {}", e.message);
                        }
                    }
                    // A lost status write is retried.
                    _ = tokio::time::sleep(Duration::from_secs(1)), if !written => {}
                }
            }
        }

        // Stop the containers: the grace period of the deletion (0 when the pod is
        // already gone from the API server).
        let latest = self.rx.borrow().clone();
        let grace = match &latest {
            None => Duration::ZERO,
            Some(p) => Duration::from_secs(
                p.metadata
                    .deletion_grace_period_seconds
                    .or(p
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds))
                    .unwrap_or(30)
                    .max(0) as u64,
            ),
        };
        info!(pod = %name, grace_s = grace.as_secs(), "stopping pod");
        for s in &stops {
            let _ = s.send(Some(grace));
        }
        for t in tasks {
            let _ = t.await;
        }
        if latest.is_some() {
            let current: Vec<ContainerStatus> =
                statuses.iter().map(|s| s.borrow().clone()).collect();
            writer.write(&current).await;
        }
        self.pool.release(&uid);
        let _ = std::fs::remove_dir_all(&pod_dir);
        if let Some(p) = latest {
            self.wait_and_finish(&api, &name, &uid, &p).await;
        }
    }

    /// After the containers are gone: finish a pending deletion (grace 0, UID
    /// precondition) once it is asked for, and end when the pod leaves the API.
    async fn wait_and_finish(&mut self, api: &Api<Pod>, name: &str, uid: &str, _pod: &Pod) {
        loop {
            let deleting = match self.rx.borrow().as_ref() {
                None => return,
                Some(p) => p.metadata.deletion_timestamp.is_some(),
            };
            if deleting {
                let dp = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions {
                        uid: Some(uid.to_string()),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                match api.delete(name, &dp).await {
                    Ok(_) => info!(pod = %name, "pod deleted"),
                    Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return,
                    Err(e) => warn!(pod = %name, "finishing deletion: {e}"),
                }
            }
            tokio::select! {
                r = self.rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    fn token_refresh_interval(&self, pod: &Pod) -> Duration {
        // The kubelet refreshes a projected token at 80% of its lifetime.
        let secs = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|v| v.projected.as_ref())
            .flat_map(|p| p.sources.iter().flatten())
            .filter_map(|s| s.service_account_token.as_ref())
            .map(|t| t.expiration_seconds.unwrap_or(3600))
            .min()
            .unwrap_or(3600);
        Duration::from_secs((secs.max(600) as u64) * 8 / 10)
    }

    /// Writes every volume's files under the pod's folder and returns the folders.
    async fn setup_volumes(
        &self,
        pod: &Pod,
        pod_dir: &Path,
    ) -> Result<BTreeMap<String, PathBuf>, spec::Waiting> {
        let ns = pod.namespace().unwrap_or_default();
        let objects = super::container::fetch_objects(&self.client, &ns, pod).await?;
        let sources = spec::volume_sources(pod, &objects)?;
        let err = |m: String| spec::Waiting::new("CreateContainerConfigError", m);
        let mut dirs = BTreeMap::new();
        for (name, src) in sources {
            let dir = pod_dir.join("volumes").join(&name);
            match src {
                VolumeSource::HostPath(p) => {
                    dirs.insert(name, p);
                    continue;
                }
                VolumeSource::EmptyDir => {
                    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
                    set_mode(&dir, 0o777).map_err(err)?;
                }
                VolumeSource::Files { files, token } => {
                    std::fs::create_dir_all(&dir).map_err(|e| err(e.to_string()))?;
                    set_mode(&dir, 0o755).map_err(err)?;
                    for f in files {
                        write_file(&dir, &f.path, &f.data, f.mode).map_err(err)?;
                    }
                    if let Some(t) = token {
                        let sa = pod
                            .spec
                            .as_ref()
                            .and_then(|s| s.service_account_name.clone())
                            .unwrap_or_else(|| "default".into());
                        let token = self.request_token(pod, &ns, &sa, &t).await?;
                        write_file(&dir, &t.path, token.as_bytes(), t.mode).map_err(err)?;
                    }
                }
            }
            dirs.insert(name, dir);
        }
        Ok(dirs)
    }

    async fn request_token(
        &self,
        pod: &Pod,
        ns: &str,
        sa: &str,
        t: &spec::TokenFile,
    ) -> Result<String, spec::Waiting> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let req = TokenRequest {
            spec: TokenRequestSpec {
                audiences: t.audience.clone().into_iter().collect(),
                expiration_seconds: Some(t.expiration_seconds),
                bound_object_ref: Some(BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod.name_any()),
                    uid: pod.uid(),
                }),
            },
            ..Default::default()
        };
        let resp = api
            .create_token_request(sa, &PostParams::default(), &req)
            .await
            .map_err(|e| {
                spec::Waiting::new(
                    "CreateContainerConfigError",
                    format!("requesting a token for service account {ns}/{sa}: {e}"),
                )
            })?;
        resp.status
            .map(|s| s.token)
            .ok_or_else(|| spec::Waiting::new("CreateContainerConfigError", "empty token response"))
    }
}

fn set_mode(p: &Path, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {}: {e}", p.display()))
}

/// Writes a volume file atomically (temp file + rename), so a refresh is never seen
/// half written.
fn write_file(dir: &Path, rel: &str, data: &[u8], mode: u32) -> Result<(), String> {
    if rel.split('/').any(|c| c == "..") || rel.starts_with('/') {
        return Err(format!("invalid volume path {rel:?}"));
    }
    let path = dir.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("mkdir {}: {e}", parent.display()))?;
    }
    let tmp = path.with_extension("snooze-tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, &path).map_err(|e| format!("rename {}: {e}", path.display()))
}

/// Computes the pod status from the container statuses and writes it when it changed.
struct StatusWriter {
    api: Api<Pod>,
    name: String,
    host_ip: String,
    pod_ip: String,
    start_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
    /// The last status written, before and after transition times were stamped.
    last: Option<serde_json::Value>,
    last_sent: Option<serde_json::Value>,
    terminal_on_exit: bool,
}

impl StatusWriter {
    fn phase(&self, cs: &[ContainerStatus]) -> &'static str {
        fn terminated(
            c: &ContainerStatus,
        ) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
            c.state.as_ref().and_then(|s| s.terminated.as_ref())
        }
        let running = |c: &ContainerStatus| c.state.as_ref().is_some_and(|s| s.running.is_some());
        if self.terminal_on_exit && !cs.is_empty() && cs.iter().all(|c| terminated(c).is_some()) {
            if cs
                .iter()
                .all(|c| terminated(c).is_some_and(|t| t.exit_code == 0))
            {
                return "Succeeded";
            }
            return "Failed";
        }
        if cs.iter().any(|c| {
            running(c)
                || c.restart_count > 0
                || c.last_state
                    .as_ref()
                    .is_some_and(|l| l.terminated.is_some())
        }) {
            "Running"
        } else {
            "Pending"
        }
    }

    fn terminal(&self) -> bool {
        self.last
            .as_ref()
            .and_then(|v| v["status"]["phase"].as_str())
            .is_some_and(|p| p == "Succeeded" || p == "Failed")
    }

    /// True when the API server has this status.
    async fn write(&mut self, cs: &[ContainerStatus]) -> bool {
        let phase = self.phase(cs);
        let all_ready = !cs.is_empty() && cs.iter().all(|c| c.ready);
        let not_ready: Vec<&str> = cs
            .iter()
            .filter(|c| !c.ready)
            .map(|c| c.name.as_str())
            .collect();
        let cond =
            |t: &str, ok: bool, reason: Option<&str>, message: Option<String>| PodCondition {
                type_: t.into(),
                status: if ok { "True" } else { "False" }.into(),
                reason: reason.map(Into::into),
                message,
                ..Default::default()
            };
        let not_ready_msg = (!all_ready)
            .then(|| format!("containers with unready status: [{}]", not_ready.join(" ")));
        let sandbox_ready = phase != "Succeeded" && phase != "Failed";
        let conditions = vec![
            cond("PodReadyToStartContainers", sandbox_ready, None, None),
            cond("Initialized", true, None, None),
            cond(
                "Ready",
                all_ready,
                (!all_ready).then_some(if phase == "Succeeded" {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }),
                not_ready_msg.clone(),
            ),
            cond(
                "ContainersReady",
                all_ready,
                (!all_ready).then_some(if phase == "Succeeded" {
                    "PodCompleted"
                } else {
                    "ContainersNotReady"
                }),
                not_ready_msg,
            ),
        ];
        let mut body = json!({
            "status": {
                "phase": phase,
                "hostIP": self.host_ip,
                "hostIPs": [HostIP { ip: self.host_ip.clone() }],
                "podIP": self.pod_ip,
                "podIPs": [PodIP { ip: self.pod_ip.clone() }],
                "startTime": self.start_time,
                "containerStatuses": cs,
                "conditions": conditions,
            }
        });
        if self.last.as_ref() == Some(&body) {
            return true;
        }
        let plain = body.clone();
        // Transition times only change when a condition's status changes.
        let stamp = now();
        if let Some(conds) = body["status"]["conditions"].as_array_mut() {
            for c in conds.iter_mut() {
                let prev = self.last_sent.as_ref().and_then(|l| {
                    l["status"]["conditions"]
                        .as_array()?
                        .iter()
                        .find(|p| p["type"] == c["type"])
                        .cloned()
                });
                let t = match prev {
                    Some(p) if p["status"] == c["status"] => p["lastTransitionTime"].clone(),
                    _ => serde_json::to_value(&stamp).unwrap_or_default(),
                };
                c["lastTransitionTime"] = t;
            }
        }
        match self
            .api
            .patch_status(
                &self.name,
                &PatchParams::default(),
                &Patch::Strategic(&body),
            )
            .await
        {
            Ok(_) => {
                self.last = Some(plain);
                self.last_sent = Some(body);
                true
            }
            Err(kube::Error::Api(e)) if e.code == 404 => true,
            Err(e) => {
                warn!(pod = %self.name, "writing pod status: {e}");
                false
            }
        }
    }
}
