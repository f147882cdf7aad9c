//! `kubectl snooze`: what users of scale-to-zero ask first — why is it awake, when will
//! it sleep — and sleep, wake or pause by hand. A kubectl plugin (found on the PATH as
//! `kubectl-snooze`); it reads ScaledServices and sets the `snooze.dev/*` annotations
//! (`snooze_crds::annotations`) with the caller's own kubeconfig and rights, as kubectl
//! would.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use snooze_crds::ScaledService;
use snooze_crds::annotations::{PAUSED, SLEEP, WAKE_UNTIL};

#[derive(Parser)]
#[command(
    name = "kubectl snooze",
    version,
    about = "Why a ScaledService is awake, when it sleeps, and sleep/wake/pause by hand"
)]
struct Cli {
    /// Namespace (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every ScaledService: replicas, state, when it sleeps, and why it is awake.
    Status {
        /// In all namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
        /// `json`: the ScaledServices as the API server has them.
        #[arg(short, long)]
        output: Option<String>,
    },
    /// Why NAME is awake: what holds it, the clients whose requests kept it awake,
    /// when it sleeps.
    Why { name: String },
    /// Put NAME to sleep now (once nothing is in flight); the next request wakes it.
    Sleep { name: String },
    /// Wake NAME now and keep it awake for a while (default: its idle timeout).
    Wake {
        name: String,
        /// How long to keep it awake, for example 30m or 1h30m.
        #[arg(long = "for")]
        for_: Option<String>,
    },
    /// Leave NAME's replicas as they are until `resume`.
    Pause { name: String },
    /// Let Snooze scale NAME again.
    Resume { name: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::try_default()
        .await
        .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let api: Api<ScaledService> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now();
    match cli.command {
        Command::Status {
            all_namespaces,
            output,
        } => {
            let list = if all_namespaces {
                Api::<ScaledService>::all(client)
                    .list(&Default::default())
                    .await?
            } else {
                api.list(&Default::default()).await?
            };
            match output.as_deref() {
                Some("json") => println!("{}", serde_json::to_string_pretty(&list.items)?),
                Some(o) => bail!("unknown output format {o:?} (json, or none for a table)"),
                None if list.items.is_empty() => {
                    eprintln!(
                        "No ScaledServices found{}.",
                        if all_namespaces {
                            String::new()
                        } else {
                            format!(" in namespace {ns}")
                        }
                    )
                }
                None => print!("{}", status_table(&list.items, all_namespaces, now)),
            }
        }
        Command::Why { name } => {
            let ss = get(&api, &name, &ns).await?;
            print!("{}", why(&ss, now));
        }
        Command::Sleep { name } => {
            get(&api, &name, &ns).await?;
            // A wake-until would hold it awake: sleeping now ends it.
            annotate(
                &api,
                &name,
                json!({SLEEP: now.to_string(), WAKE_UNTIL: null}),
            )
            .await?;
            println!("{ns}/{name}: asked to sleep ({SLEEP}={now}); the next request wakes it");
        }
        Command::Wake { name, for_ } => {
            let ss = get(&api, &name, &ns).await?;
            let d = match for_ {
                Some(f) => f
                    .parse::<kube::core::Duration>()
                    .map_err(|e| anyhow::anyhow!("--for {f:?}: {e} (for example 30m or 1h30m)"))?
                    .into(),
                None => ss.spec.idle_timeout(),
            };
            let until = now
                .checked_add(d)
                .context("--for is too long")?
                .round(k8s_openapi::jiff::Unit::Second)?;
            // A sleep asked for and not yet done would follow the wake: it is dropped.
            annotate(
                &api,
                &name,
                json!({WAKE_UNTIL: until.to_string(), SLEEP: null}),
            )
            .await?;
            println!("{ns}/{name}: awake until {until} ({WAKE_UNTIL}), then its idle timeout runs");
        }
        Command::Pause { name } => {
            get(&api, &name, &ns).await?;
            annotate(&api, &name, json!({PAUSED: "true"})).await?;
            println!(
                "{ns}/{name}: paused; Snooze leaves its replicas as they are until `kubectl snooze resume {name}`"
            );
        }
        Command::Resume { name } => {
            get(&api, &name, &ns).await?;
            annotate(&api, &name, json!({PAUSED: null})).await?;
            println!("{ns}/{name}: resumed");
        }
    }
    Ok(())
}

async fn get(api: &Api<ScaledService>, name: &str, ns: &str) -> anyhow::Result<ScaledService> {
    api.get_opt(name)
        .await?
        .with_context(|| format!("ScaledService {name} not found in namespace {ns}"))
}

async fn annotate(
    api: &Api<ScaledService>,
    name: &str,
    annotations: serde_json::Value,
) -> anyhow::Result<()> {
    let patch = json!({"metadata": {"annotations": annotations}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// `4m10s`, `42s`, `1h5m`.
fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn since(now: Timestamp, t: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(t)).unwrap_or_default()
}

fn state(ss: &ScaledService) -> String {
    let st = ss.status.clone().unwrap_or_default();
    if let Some(c) = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "False")
    {
        return format!("NotReady ({})", c.reason);
    }
    if st.paused {
        return "Paused".into();
    }
    match (st.replicas.unwrap_or(0), st.ready_replicas.unwrap_or(0)) {
        (0, _) => "Asleep".into(),
        (_, 0) => "Waking".into(),
        _ => "Awake".into(),
    }
}

fn sleeps_in(ss: &ScaledService, now: Timestamp) -> String {
    match ss.status.as_ref().and_then(|s| s.sleeps_at.as_ref()) {
        Some(t) if t.0 > now => human(since(t.0, now)),
        Some(_) => "now".into(),
        None => "-".into(),
    }
}

fn table(rows: Vec<Vec<String>>) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i + 1 == cols {
                    c.clone()
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

fn status_table(items: &[ScaledService], all_namespaces: bool, now: Timestamp) -> String {
    let mut rows = vec![];
    let mut head = vec![];
    if all_namespaces {
        head.push("NAMESPACE".to_string());
    }
    head.extend(["NAME", "REPLICAS", "STATE", "SLEEPS IN", "AWAKE BECAUSE"].map(String::from));
    rows.push(head);
    for ss in items {
        let st = ss.status.clone().unwrap_or_default();
        let mut r = vec![];
        if all_namespaces {
            r.push(ss.namespace().unwrap_or_default());
        }
        r.push(ss.name_any());
        r.push(format!(
            "{}/{}",
            st.ready_replicas.unwrap_or(0),
            st.replicas.unwrap_or(0)
        ));
        r.push(state(ss));
        r.push(sleeps_in(ss, now));
        r.push(st.awake_because.clone().unwrap_or_else(|| "-".into()));
        rows.push(r);
    }
    table(rows)
}

fn why(ss: &ScaledService, now: Timestamp) -> String {
    let st = ss.status.clone().unwrap_or_default();
    let mut out = format!(
        "{}/{}: {}, {} of {} replica(s) ready\n",
        ss.namespace().unwrap_or_default(),
        ss.name_any(),
        state(ss),
        st.ready_replicas.unwrap_or(0),
        st.replicas.unwrap_or(0)
    );
    let line = |out: &mut String, k: &str, v: String| out.push_str(&format!("{k:<15}{v}\n"));
    match (&st.awake_because, st.replicas.unwrap_or(0)) {
        (Some(b), _) => line(&mut out, "Awake because:", b.clone()),
        (None, 0) => line(&mut out, "Asleep:", "the next request wakes it".into()),
        (None, _) => line(
            &mut out,
            "Awake because:",
            "woken; no request counted yet".into(),
        ),
    }
    if let Some(t) = &st.sleeps_at {
        let when = if t.0 > now {
            format!("in {}", human(since(t.0, now)))
        } else {
            "now".into()
        };
        line(
            &mut out,
            "Sleeps at:",
            format!(
                "{} ({when}, idle timeout {}), unless a request comes",
                t.0,
                human(ss.spec.idle_timeout())
            ),
        );
    }
    if !st.needed_by.is_empty() {
        line(&mut out, "Needed by:", st.needed_by.join(", "));
    }
    if let Some(t) = &st.awake_until {
        line(&mut out, "Woken until:", t.0.to_string());
    }
    if let Some(t) = &st.last_request_time {
        line(
            &mut out,
            "Last request:",
            format!("{} ({} ago)", t.0, human(since(now, t.0))),
        );
    }
    if st.activity.is_empty() {
        out.push_str("No client kept it awake in the current idle window.\n");
    } else {
        out.push_str("Clients that kept it awake in the current idle window:\n");
        let mut rows = vec![
            [
                "CLIENT",
                "USER-AGENT",
                "METHOD",
                "PATH",
                "COUNT",
                "LAST SEEN",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for a in &st.activity {
            rows.push(vec![
                a.client.clone(),
                a.user_agent.clone().unwrap_or_else(|| "-".into()),
                a.method.clone(),
                a.path.clone().unwrap_or_else(|| "-".into()),
                a.count.to_string(),
                format!("{} ago", human(since(now, a.last_seen.0))),
            ]);
        }
        for l in table(rows).lines() {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ss(status: serde_json::Value) -> ScaledService {
        serde_json::from_value(json!({
            "apiVersion": "snooze.dev/v1alpha1", "kind": "ScaledService",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"scaleTargetRef": {"name": "web"}, "service": "web", "idleTimeout": "5m"},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn status_and_why_say_what_holds_it_and_when_it_sleeps() {
        let now: Timestamp = "2026-12-03T18:00:00Z".parse().unwrap();
        let awake = ss(json!({
            "replicas": 1, "readyReplicas": 1,
            "sleepsAt": "2026-12-03T18:04:10Z",
            "awakeBecause": "kube-probe/1.33 GET /healthz ×120 from 10.0.0.5",
            "lastRequestTime": "2026-12-03T17:59:10Z",
            "activity": [{"client": "10.0.0.5", "userAgent": "kube-probe/1.33", "method": "GET",
                          "path": "/healthz", "count": 120, "lastSeen": "2026-12-03T17:59:10Z"}],
        }));
        let asleep = ss(json!({"replicas": 0, "readyReplicas": 0}));
        let t = status_table(&[awake.clone(), asleep], false, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAME   REPLICAS   STATE    SLEEPS IN   AWAKE BECAUSE"
        );
        assert_eq!(
            lines[1],
            "web    1/1        Awake    4m10s       kube-probe/1.33 GET /healthz ×120 from 10.0.0.5"
        );
        assert_eq!(lines[2], "web    0/0        Asleep   -           -");
        let w = why(&awake, now);
        assert!(
            w.contains("Sleeps at:     2026-12-03T18:04:10Z (in 4m10s"),
            "{w}"
        );
        assert!(
            w.contains("10.0.0.5   kube-probe/1.33   GET      /healthz   120     50s ago"),
            "{w}"
        );
    }

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_secs(42)), "42s");
        assert_eq!(human(Duration::from_secs(250)), "4m10s");
        assert_eq!(human(Duration::from_secs(3900)), "1h5m");
    }
}
