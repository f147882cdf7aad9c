//! What the node agent derives from a pod spec before it starts a container: the
//! executable an image maps to, the environment, `$(VAR)` expansion and the files of
//! the pod's volumes. Kept free of process handling so it can be unit tested.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, ObjectFieldSelector, Pod, Secret};
use serde::Deserialize;

/// A reason and message the way the kubelet reports a container it could not start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: &'static str,
    pub message: String,
}

impl Waiting {
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

/// The image → executable map, read from a JSON file on every container start so that
/// a mapping added while a pod waits is picked up by the next pull attempt.
#[derive(Debug, Default, Deserialize)]
pub struct ImageMap {
    /// Keys are `repository` (any tag) or `repository:tag`; values are executables.
    pub images: BTreeMap<String, PathBuf>,
}

impl ImageMap {
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading image map {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("parsing image map {}: {e}", path.display()))
    }

    /// The executable for `image`: an exact `repo:tag` entry wins over a `repo` entry.
    pub fn resolve(&self, image: &str) -> Option<&Path> {
        if let Some(p) = self.images.get(image) {
            return Some(p);
        }
        self.images.get(repository(image)).map(PathBuf::as_path)
    }
}

/// `registry/repo` of an image reference, without tag or digest.
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rfind(':') {
        // A colon after the last slash is a tag; before it, a registry port.
        Some(i) if !no_digest[i..].contains('/') => &no_digest[..i],
        _ => no_digest,
    }
}

/// Expands `$(NAME)` with the values in `vars`, like the kubelet: `$$` escapes a
/// reference, and a reference to an unknown name stays as written.
pub fn expand(input: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::with_capacity(input.len());
    let bytes = input.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && i + 1 < bytes.len() {
            if bytes[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if bytes[i + 1] == b'('
                && let Some(end) = input[i + 2..].find(')')
            {
                let name = &input[i + 2..i + 2 + end];
                match vars.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&input[i..i + 3 + end]),
                }
                i += 3 + end;
                continue;
            }
        }
        let ch = input[i..].chars().next().unwrap_or('$');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Looks up the ConfigMaps and Secrets a pod refers to. The node agent fetches them
/// from the API server with its node credentials; tests use plain maps.
pub trait Objects {
    fn config_map(&self, name: &str) -> Option<&ConfigMap>;
    fn secret(&self, name: &str) -> Option<&Secret>;
}

#[derive(Default)]
pub struct ObjectCache {
    pub config_maps: HashMap<String, ConfigMap>,
    pub secrets: HashMap<String, Secret>,
}

impl Objects for ObjectCache {
    fn config_map(&self, name: &str) -> Option<&ConfigMap> {
        self.config_maps.get(name)
    }
    fn secret(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name)
    }
}

/// Names of the ConfigMaps and Secrets a pod's env, envFrom and volumes read.
pub fn referenced_objects(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let mut cms = Vec::new();
    let mut secrets = Vec::new();
    let Some(spec) = &pod.spec else {
        return (cms, secrets);
    };
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for e in c.env.iter().flatten() {
            if let Some(vf) = &e.value_from {
                if let Some(r) = &vf.config_map_key_ref {
                    cms.push(r.name.clone());
                }
                if let Some(r) = &vf.secret_key_ref {
                    secrets.push(r.name.clone());
                }
            }
        }
        for ef in c.env_from.iter().flatten() {
            if let Some(r) = &ef.config_map_ref {
                cms.push(r.name.clone());
            }
            if let Some(r) = &ef.secret_ref {
                secrets.push(r.name.clone());
            }
        }
    }
    for v in spec.volumes.iter().flatten() {
        if let Some(cm) = &v.config_map {
            cms.push(cm.name.clone());
        }
        if let Some(s) = &v.secret {
            secrets.extend(s.secret_name.clone());
        }
        if let Some(p) = &v.projected {
            for src in p.sources.iter().flatten() {
                if let Some(cm) = &src.config_map {
                    cms.push(cm.name.clone());
                }
                if let Some(s) = &src.secret {
                    secrets.push(s.name.clone());
                }
            }
        }
    }
    cms.sort();
    cms.dedup();
    secrets.sort();
    secrets.dedup();
    (cms, secrets)
}

/// The value of a downward-API field of the pod.
pub fn field_value(pod: &Pod, sel: &ObjectFieldSelector) -> Result<String, String> {
    let meta = &pod.metadata;
    let status = pod.status.as_ref();
    let path = sel.field_path.as_str();
    let label = |map: &Option<BTreeMap<String, String>>, prefix: &str| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(
            map.as_ref()
                .and_then(|m| m.get(key))
                .cloned()
                .unwrap_or_default(),
        )
    };
    if let Some(v) = label(&meta.labels, "metadata.labels['") {
        return Ok(v);
    }
    if let Some(v) = label(&meta.annotations, "metadata.annotations['") {
        return Ok(v);
    }
    let v = match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.podIPs" => status.and_then(|s| {
            s.pod_ips.as_ref().map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
        }),
        other => return Err(format!("unsupported fieldRef {other:?}")),
    };
    Ok(v.unwrap_or_default())
}

/// The environment of a container in the order the kubelet builds it: service
/// variables first, then `envFrom`, then `env` (each may refer to earlier ones).
pub fn container_env(
    pod: &Pod,
    container: &Container,
    objects: &dyn Objects,
    base: &[(String, String)],
) -> Result<Vec<(String, String)>, Waiting> {
    let mut order: Vec<String> = Vec::new();
    let mut vars: HashMap<String, String> = HashMap::new();
    let set =
        |k: String, v: String, order: &mut Vec<String>, vars: &mut HashMap<String, String>| {
            if vars.insert(k.clone(), v).is_none() {
                order.push(k);
            }
        };
    for (k, v) in base {
        set(k.clone(), v.clone(), &mut order, &mut vars);
    }
    let cfg_err = |m: String| Waiting::new("CreateContainerConfigError", m);
    for ef in container.env_from.iter().flatten() {
        let prefix = ef.prefix.clone().unwrap_or_default();
        if let Some(r) = &ef.config_map_ref {
            match objects.config_map(&r.name) {
                Some(cm) => {
                    for (k, v) in cm.data.iter().flatten() {
                        set(format!("{prefix}{k}"), v.clone(), &mut order, &mut vars);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(cfg_err(format!("configmap \"{}\" not found", r.name))),
            }
        }
        if let Some(r) = &ef.secret_ref {
            match objects.secret(&r.name) {
                Some(s) => {
                    for (k, v) in s.data.iter().flatten() {
                        let v = String::from_utf8_lossy(&v.0).into_owned();
                        set(format!("{prefix}{k}"), v, &mut order, &mut vars);
                    }
                }
                None if r.optional == Some(true) => {}
                None => return Err(cfg_err(format!("secret \"{}\" not found", r.name))),
            }
        }
    }
    for EnvVar {
        name,
        value,
        value_from,
    } in container.env.iter().flatten()
    {
        let v = if let Some(vf) = value_from {
            if let Some(f) = &vf.field_ref {
                field_value(pod, f).map_err(cfg_err)?
            } else if let Some(r) = &vf.config_map_key_ref {
                let found = objects
                    .config_map(&r.name)
                    .and_then(|cm| cm.data.as_ref()?.get(&r.key).cloned());
                match found {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(cfg_err(format!(
                            "couldn't find key {} in ConfigMap {}/{}",
                            r.key,
                            pod.metadata.namespace.as_deref().unwrap_or(""),
                            r.name
                        )));
                    }
                }
            } else if let Some(r) = &vf.secret_key_ref {
                let found = objects
                    .secret(&r.name)
                    .and_then(|s| s.data.as_ref()?.get(&r.key).cloned());
                match found {
                    Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => {
                        return Err(cfg_err(format!(
                            "couldn't find key {} in Secret {}/{}",
                            r.key,
                            pod.metadata.namespace.as_deref().unwrap_or(""),
                            r.name
                        )));
                    }
                }
            } else if let Some(r) = &vf.resource_field_ref {
                resource_value(container, &r.resource)
            } else {
                String::new()
            }
        } else {
            expand(value.as_deref().unwrap_or(""), &vars)
        };
        set(name.clone(), v, &mut order, &mut vars);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars.remove(&k).unwrap_or_default();
            (k, v)
        })
        .collect())
}

/// `limits.cpu` and friends: the container's own value, else the node's capacity.
fn resource_value(container: &Container, resource: &str) -> String {
    let (kind, name) = resource.split_once('.').unwrap_or(("limits", resource));
    let res = container.resources.as_ref();
    let q = match kind {
        "requests" => res.and_then(|r| r.requests.as_ref()?.get(name).cloned()),
        _ => res.and_then(|r| r.limits.as_ref()?.get(name).cloned()),
    };
    match (q, name) {
        (Some(q), _) => q.0,
        (None, "cpu") => super::NODE_CPU.to_string(),
        (None, "memory") => super::NODE_MEMORY_BYTES.to_string(),
        (None, _) => "0".to_string(),
    }
}

/// The argv of a container: `command` replaces the image's entrypoint (its first
/// word names the entrypoint, which is the mapped executable), `args` follow.
pub fn container_argv(container: &Container, env: &[(String, String)]) -> Vec<String> {
    let vars: HashMap<String, String> = env.iter().cloned().collect();
    let command = container.command.iter().flatten().skip(1);
    command
        .chain(container.args.iter().flatten())
        .map(|a| expand(a, &vars))
        .collect()
}

/// One file of a volume: a path relative to the volume's folder and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

/// What the agent must do for one pod volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    /// A folder that starts empty and lives as long as the pod.
    EmptyDir,
    /// A folder on the host, mounted as it is.
    HostPath(PathBuf),
    /// Files written by the agent; `token` is `Some((path, audience, seconds))` when a
    /// service-account token is part of it.
    Files {
        files: Vec<VolumeFile>,
        token: Option<TokenFile>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFile {
    pub path: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
    pub mode: u32,
}

fn key_files(
    data: Vec<(String, Vec<u8>)>,
    items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>,
    mode: u32,
    what: &str,
) -> Result<Vec<VolumeFile>, String> {
    match items {
        None => Ok(data
            .into_iter()
            .map(|(k, d)| VolumeFile {
                path: k,
                data: d,
                mode,
            })
            .collect()),
        Some(items) => items
            .iter()
            .map(|it| {
                let d = data
                    .iter()
                    .find(|(k, _)| *k == it.key)
                    .map(|(_, d)| d.clone())
                    .ok_or_else(|| format!("{what}: no key {}", it.key))?;
                Ok(VolumeFile {
                    path: it.path.clone(),
                    data: d,
                    mode: it.mode.map(|m| m as u32).unwrap_or(mode),
                })
            })
            .collect(),
    }
}

fn cm_data(cm: &ConfigMap) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = cm
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    out.extend(
        cm.binary_data
            .iter()
            .flatten()
            .map(|(k, v)| (k.clone(), v.0.clone())),
    );
    out
}

fn secret_data(s: &Secret) -> Vec<(String, Vec<u8>)> {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

/// Resolves every volume of the pod to what the agent writes or mounts.
pub fn volume_sources(
    pod: &Pod,
    objects: &dyn Objects,
) -> Result<BTreeMap<String, VolumeSource>, Waiting> {
    let mut out = BTreeMap::new();
    let Some(spec) = &pod.spec else {
        return Ok(out);
    };
    let err = |m: String| Waiting::new("CreateContainerConfigError", m);
    for v in spec.volumes.iter().flatten() {
        let src = if v.empty_dir.is_some() {
            VolumeSource::EmptyDir
        } else if let Some(h) = &v.host_path {
            VolumeSource::HostPath(PathBuf::from(&h.path))
        } else if let Some(c) = &v.config_map {
            let mode = c.default_mode.unwrap_or(0o644) as u32;
            let files = match objects.config_map(&c.name) {
                Some(cm) => key_files(cm_data(cm), c.items.as_ref(), mode, &c.name).map_err(err)?,
                None if c.optional == Some(true) => vec![],
                None => return Err(err(format!("configmap \"{}\" not found", c.name))),
            };
            VolumeSource::Files { files, token: None }
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            let files = match objects.secret(&name) {
                Some(sec) => {
                    key_files(secret_data(sec), s.items.as_ref(), mode, &name).map_err(err)?
                }
                None if s.optional == Some(true) => vec![],
                None => return Err(err(format!("secret \"{name}\" not found"))),
            };
            VolumeSource::Files { files, token: None }
        } else if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644) as u32;
            let mut files = Vec::new();
            for it in d.items.iter().flatten() {
                if let Some(f) = &it.field_ref {
                    files.push(VolumeFile {
                        path: it.path.clone(),
                        data: field_value(pod, f).map_err(err)?.into_bytes(),
                        mode: it.mode.map(|m| m as u32).unwrap_or(mode),
                    });
                }
            }
            VolumeSource::Files { files, token: None }
        } else if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            let mut files = Vec::new();
            let mut token = None;
            for s in p.sources.iter().flatten() {
                if let Some(t) = &s.service_account_token {
                    token = Some(TokenFile {
                        path: t.path.clone(),
                        audience: t.audience.clone(),
                        expiration_seconds: t.expiration_seconds.unwrap_or(3600),
                        mode,
                    });
                }
                if let Some(c) = &s.config_map {
                    match objects.config_map(&c.name) {
                        Some(cm) => files.extend(
                            key_files(cm_data(cm), c.items.as_ref(), mode, &c.name).map_err(err)?,
                        ),
                        None if c.optional == Some(true) => {}
                        None => return Err(err(format!("configmap \"{}\" not found", c.name))),
                    }
                }
                if let Some(sc) = &s.secret {
                    match objects.secret(&sc.name) {
                        Some(sec) => files.extend(
                            key_files(secret_data(sec), sc.items.as_ref(), mode, &sc.name)
                                .map_err(err)?,
                        ),
                        None if sc.optional == Some(true) => {}
                        None => return Err(err(format!("secret \"{}\" not found", sc.name))),
                    }
                }
                if let Some(d) = &s.downward_api {
                    for it in d.items.iter().flatten() {
                        if let Some(f) = &it.field_ref {
                            files.push(VolumeFile {
                                path: it.path.clone(),
                                data: field_value(pod, f).map_err(err)?.into_bytes(),
                                mode: it.mode.map(|m| m as u32).unwrap_or(mode),
                            });
                        }
                    }
                }
            }
            VolumeSource::Files { files, token }
        } else {
            return Err(err(format!(
                "volume {:?}: this volume type is not supported by the snooze node agent",
                v.name
            )));
        };
        out.insert(v.name.clone(), src);
    }
    Ok(out)
}

/// The resolv.conf the kubelet would give the pod, or `None` for the host's file.
/// `ClusterFirst` (the default) points at the cluster DNS with the namespace's search
/// path and `ndots:5`; host-network pods get that only with `ClusterFirstWithHostNet`;
/// `Default` is the host's file; `None` is `dnsConfig` alone. `dnsConfig` adds
/// nameservers (3 at most), search domains (32 at most) and options (by name, the
/// pod's win).
pub fn resolv_conf(pod: &Pod, cluster_dns: Option<&str>, domain: &str) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_net = spec.host_network == Some(true);
    let (mut servers, mut search, mut options): (Vec<String>, Vec<String>, Vec<String>) =
        match spec.dns_policy.as_deref().unwrap_or("ClusterFirst") {
            "None" => (vec![], vec![], vec![]),
            "ClusterFirstWithHostNet" | "ClusterFirst"
                if cluster_dns.is_some()
                    && (!host_net
                        || spec.dns_policy.as_deref() == Some("ClusterFirstWithHostNet")) =>
            {
                (
                    vec![cluster_dns?.to_string()],
                    vec![
                        format!("{ns}.svc.{domain}"),
                        format!("svc.{domain}"),
                        domain.to_string(),
                    ],
                    vec!["ndots:5".into()],
                )
            }
            _ if spec.dns_config.is_none() => return None,
            // Default (or no cluster DNS) with dnsConfig: the host's nameservers first.
            _ => {
                let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let servers = host
                    .lines()
                    .filter_map(|l| l.strip_prefix("nameserver"))
                    .map(|a| a.trim().to_string())
                    .collect();
                (servers, vec![], vec![])
            }
        };
    if let Some(c) = &spec.dns_config {
        servers.extend(c.nameservers.iter().flatten().cloned());
        search.extend(c.searches.iter().flatten().cloned());
        for o in c.options.iter().flatten() {
            let Some(name) = o.name.as_deref() else {
                continue;
            };
            options.retain(|x| x.split(':').next() != Some(name));
            options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            });
        }
    }
    servers.dedup();
    servers.truncate(3);
    search.dedup();
    search.truncate(32);
    let mut out = String::new();
    for s in &servers {
        out.push_str(&format!("nameserver {s}\n"));
    }
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if !options.is_empty() {
        out.push_str(&format!("options {}\n", options.join(" ")));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVarSource, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn resolv_conf_follows_the_dns_policy() {
        let pod = |policy: Option<&str>, host_net: bool, cfg: Option<serde_json::Value>| Pod {
            metadata: ObjectMeta {
                namespace: Some("shop".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                dns_policy: policy.map(Into::into),
                host_network: Some(host_net),
                dns_config: cfg.map(|c| serde_json::from_value(c).unwrap()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cluster = "nameserver 10.96.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n";
        let dns = Some("10.96.0.10");
        let r = |p: &Pod, d: Option<&str>| resolv_conf(p, d, "cluster.local");
        assert_eq!(r(&pod(None, false, None), dns).as_deref(), Some(cluster));
        assert_eq!(
            r(&pod(Some("ClusterFirst"), false, None), dns).as_deref(),
            Some(cluster)
        );
        // No cluster DNS configured, host network, or Default: the host's file.
        assert_eq!(r(&pod(None, false, None), None), None);
        assert_eq!(r(&pod(Some("ClusterFirst"), true, None), dns), None);
        assert_eq!(r(&pod(Some("Default"), false, None), dns), None);
        assert_eq!(
            r(&pod(Some("ClusterFirstWithHostNet"), true, None), dns).as_deref(),
            Some(cluster)
        );
        let cfg = serde_json::json!({
            "nameservers": ["1.1.1.1"],
            "searches": ["corp.example"],
            "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]
        });
        assert_eq!(
            r(&pod(None, false, Some(cfg.clone())), dns).as_deref(),
            Some(
                "nameserver 10.96.0.10\nnameserver 1.1.1.1\nsearch shop.svc.cluster.local svc.cluster.local cluster.local corp.example\noptions ndots:2 edns0\n"
            )
        );
        assert_eq!(
            r(&pod(Some("None"), false, Some(cfg)), dns).as_deref(),
            Some("nameserver 1.1.1.1\nsearch corp.example\noptions ndots:2 edns0\n")
        );
    }

    #[test]
    fn repository_strips_tag_and_digest_not_port() {
        assert_eq!(repository("ghcr.io/a/b:1.0"), "ghcr.io/a/b");
        assert_eq!(repository("localhost:5000/a/b"), "localhost:5000/a/b");
        assert_eq!(repository("localhost:5000/a/b:2"), "localhost:5000/a/b");
        assert_eq!(repository("a/b@sha256:abc"), "a/b");
        assert_eq!(repository("nginx"), "nginx");
    }

    #[test]
    fn image_map_prefers_exact_tag() {
        let m: ImageMap =
            serde_json::from_str(r#"{"images":{"x/app":"/bin/any","x/app:2":"/bin/two"}}"#)
                .unwrap();
        assert_eq!(m.resolve("x/app:2"), Some(Path::new("/bin/two")));
        assert_eq!(m.resolve("x/app:1"), Some(Path::new("/bin/any")));
        assert_eq!(m.resolve("y/app:1"), None);
    }

    #[test]
    fn expand_like_kubelet() {
        let vars: HashMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("--x=$(A)", &vars), "--x=1");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$(A", &vars), "$(A");
        assert_eq!(expand("é$(A)é", &vars), "é1é");
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec::default()),
            status: Some(PodStatus {
                pod_ip: Some("10.244.0.9".into()),
                ..Default::default()
            }),
        }
    }

    fn field(path: &str) -> Option<EnvVarSource> {
        Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    #[test]
    fn env_with_downward_api_and_references() {
        let c = Container {
            name: "c".into(),
            env: Some(vec![
                EnvVar {
                    name: "POD_IP".into(),
                    value_from: field("status.podIP"),
                    ..Default::default()
                },
                EnvVar {
                    name: "APP".into(),
                    value_from: field("metadata.labels['app']"),
                    ..Default::default()
                },
                EnvVar {
                    name: "ADDR".into(),
                    value: Some("$(POD_IP):8080".into()),
                    ..Default::default()
                },
            ]),
            args: Some(vec!["--listen=$(ADDR)".into()]),
            ..Default::default()
        };
        let env = container_env(&pod(), &c, &ObjectCache::default(), &[]).unwrap();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("POD_IP"), Some("10.244.0.9"));
        assert_eq!(get("APP"), Some("web"));
        assert_eq!(get("ADDR"), Some("10.244.0.9:8080"));
        assert_eq!(container_argv(&c, &env), vec!["--listen=10.244.0.9:8080"]);
    }

    #[test]
    fn missing_config_map_is_a_config_error() {
        let c = Container {
            name: "c".into(),
            env: Some(vec![EnvVar {
                name: "X".into(),
                value_from: Some(EnvVarSource {
                    config_map_key_ref: Some(k8s_openapi::api::core::v1::ConfigMapKeySelector {
                        name: "cfg".into(),
                        key: "k".into(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        };
        let err = container_env(&pod(), &c, &ObjectCache::default(), &[]).unwrap_err();
        assert_eq!(err.reason, "CreateContainerConfigError");
        assert!(err.message.contains("cfg"), "{}", err.message);
    }
}
