//! Server-side printing: `Accept: application/json;as=Table;g=meta.k8s.io;v=v1`, which is how
//! `kubectl get` learns its columns. Built-in kinds get the columns kube-apiserver prints; custom
//! resources get Name plus their CRD's `additionalPrinterColumns`.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::ops;
use crate::registry::ResourceType;

/// What each row carries besides its cells (`includeObject`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum IncludeObject {
    /// No object.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object.
    Object,
}

impl IncludeObject {
    /// Parses the `includeObject` query parameter.
    pub fn parse(s: Option<&str>) -> Result<Self, String> {
        match s {
            None | Some("") | Some("Metadata") => Ok(IncludeObject::Metadata),
            Some("None") => Ok(IncludeObject::None),
            Some("Object") => Ok(IncludeObject::Object),
            Some(other) => Err(format!(
                "includeObject: unsupported value {other:?}; use None, Metadata or Object"
            )),
        }
    }
}

/// Kubernetes' human-readable durations (`5s`, `3m20s`, `5h`, `2d3h`, `2y`).
pub fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let m = s / 60;
    let h = s / 3600;
    let d = h / 24;
    let y = d / 365;
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if m < 180 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if y < 8 {
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{y}y")
    }
}

fn age(ts: &Value, now: DateTime<Utc>) -> Value {
    match ts
        .as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
    {
        Some(t) => Value::String(human_duration((now - t.with_timezone(&Utc)).num_seconds())),
        None => Value::String("<unknown>".into()),
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[*].b`,
/// `.a[?(@.type=="Ready")].status`. Returns every match.
pub fn json_path<'a>(obj: &'a Value, path: &str) -> Vec<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let path = path.strip_prefix('$').unwrap_or(path);
    let mut cur: Vec<&Value> = vec![obj];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let field = &r[..end];
            rest = &r[end..];
            if field.is_empty() {
                continue;
            }
            cur = cur.into_iter().filter_map(|v| v.get(field)).collect();
        } else if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return Vec::new();
            };
            let sel = &r[..end];
            rest = &r[end + 1..];
            let items = cur.into_iter().filter_map(Value::as_array).flatten();
            cur = if sel == "*" {
                items.collect()
            } else if let Some(filter) = sel.strip_prefix("?(@.").and_then(|f| f.strip_suffix(')'))
            {
                let (field, want) = match filter.split_once("==") {
                    Some((f, w)) => (f.trim(), w.trim().trim_matches(['"', '\''])),
                    None => return Vec::new(),
                };
                items
                    .filter(|i| i.get(field).and_then(Value::as_str) == Some(want))
                    .collect()
            } else if let Ok(i) = sel.parse::<usize>() {
                let all: Vec<&Value> = items.collect();
                all.get(i).copied().into_iter().collect()
            } else if let Some(back) = sel
                .strip_suffix(':')
                .and_then(|s| s.strip_prefix('-'))
                .or(sel.strip_prefix('-'))
                .and_then(|n| n.parse::<usize>().ok())
            {
                // `[-1:]` (the last item, as printer columns use it) and `[-1]`.
                let all: Vec<&Value> = items.collect();
                let start = all.len().saturating_sub(back);
                if sel.ends_with(':') {
                    all[start..].to_vec()
                } else if back <= all.len() {
                    all.get(start).copied().into_iter().collect()
                } else {
                    Vec::new()
                }
            } else {
                return Vec::new();
            };
        } else {
            return Vec::new();
        }
    }
    cur
}

fn col(name: &str, type_: &str, priority: i64, description: &str) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": type_, "format": format, "description": description, "priority": priority})
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A map of strings as kubectl prints selectors: `k=v,k2=v2` (empty when there is none).
pub(crate) fn pairs(m: &Value) -> String {
    m.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", s(v)))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn or_none(v: &Value) -> Value {
    let t = s(v);
    Value::String(if t.is_empty() { "<none>".into() } else { t })
}

fn columns(rt: &ResourceType) -> Vec<Value> {
    let name = col(
        "Name",
        "string",
        0,
        "Name must be unique within a namespace.",
    );
    let age = col(
        "Age",
        "string",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Pod") => vec![
            name,
            col(
                "Ready",
                "string",
                0,
                "The aggregate readiness state of this pod for accepting traffic.",
            ),
            col(
                "Status",
                "string",
                0,
                "The aggregate status of the containers in this pod.",
            ),
            col(
                "Restarts",
                "string",
                0,
                "The number of times the containers in this pod have been restarted.",
            ),
            age,
            col("IP", "string", 1, "IP address allocated to the pod."),
            col(
                "Node",
                "string",
                1,
                "Name of the Node this pod is assigned to.",
            ),
            col(
                "Nominated Node",
                "string",
                1,
                "Node nominated for preemption.",
            ),
            col("Readiness Gates", "string", 1, "Pod readiness gates."),
        ],
        ("", "Node") => vec![
            name,
            col("Status", "string", 0, "The status of the node"),
            col("Roles", "string", 0, "The roles of the node"),
            age,
            col(
                "Version",
                "string",
                0,
                "Kubelet Version reported by the node.",
            ),
            col("Internal-IP", "string", 1, "List of internal IPs."),
            col("External-IP", "string", 1, "List of external IPs."),
            col("OS-Image", "string", 1, "OS image reported by the node."),
            col(
                "Kernel-Version",
                "string",
                1,
                "Kernel version reported by the node.",
            ),
            col(
                "Container-Runtime",
                "string",
                1,
                "Container runtime reported by the node.",
            ),
        ],
        ("", "Namespace") => vec![
            name,
            col("Status", "string", 0, "The status of the namespace"),
            age,
        ],
        ("", "ConfigMap") => vec![name, col("Data", "string", 0, "Number of keys"), age],
        ("", "Secret") => vec![
            name,
            col("Type", "string", 0, "The type of the secret"),
            col("Data", "string", 0, "The number of entries in data"),
            age,
        ],
        ("", "Service") => vec![
            name,
            col("Type", "string", 0, "The type of the service."),
            col("Cluster-IP", "string", 0, "The cluster IP of the service."),
            col(
                "External-IP",
                "string",
                0,
                "The external IPs of the service.",
            ),
            col("Port(s)", "string", 0, "The ports of the service."),
            age,
            col("Selector", "string", 1, "The selector of the service."),
        ],
        ("", "Endpoints") => vec![name, col("Endpoints", "string", 0, "Endpoints"), age],
        ("", "Event") => vec![
            col(
                "Last Seen",
                "string",
                0,
                "Time since the event was last seen.",
            ),
            col("Type", "string", 0, "Type of the event."),
            col("Reason", "string", 0, "Reason of the event."),
            col("Object", "string", 0, "The object this event is about."),
            col("Message", "string", 0, "Message of the event."),
        ],
        ("", "ServiceAccount") => vec![name, col("Secrets", "string", 0, "Number of secrets"), age],
        ("coordination.k8s.io", "Lease") => vec![
            name,
            col("Holder", "string", 0, "The holder of the lease."),
            age,
        ],
        ("apps", "Deployment") => {
            let mut v = vec![
                name,
                col("Ready", "string", 0, "Number of the pod with ready state"),
                col(
                    "Up-to-date",
                    "string",
                    0,
                    "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
                ),
                col(
                    "Available",
                    "string",
                    0,
                    "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
                ),
                age,
            ];
            v.extend(template_columns());
            v
        }
        ("apps", "ReplicaSet") => {
            let mut v = vec![
                name,
                col("Desired", "integer", 0, "Number of desired pods."),
                col("Current", "integer", 0, "Number of actual pods."),
                col("Ready", "integer", 0, "Number of pods ready."),
                age,
            ];
            v.extend(template_columns());
            v
        }
        ("apps", "DaemonSet") => {
            let mut v = vec![
                name,
                col(
                    "Desired",
                    "integer",
                    0,
                    "The total number of nodes that should be running the daemon pod.",
                ),
                col(
                    "Current",
                    "integer",
                    0,
                    "The number of nodes that are running at least 1 daemon pod and are supposed to run the daemon pod.",
                ),
                col(
                    "Ready",
                    "integer",
                    0,
                    "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and ready.",
                ),
                col(
                    "Up-to-date",
                    "integer",
                    0,
                    "The total number of nodes that are running updated daemon pod",
                ),
                col(
                    "Available",
                    "integer",
                    0,
                    "The number of nodes that should be running the daemon pod and have one or more of the daemon pod running and available.",
                ),
                col(
                    "Node Selector",
                    "string",
                    0,
                    "NodeSelector is a selector which must be true for the pod to fit on a node.",
                ),
                age,
            ];
            v.extend(template_columns());
            v
        }
        ("batch", "Job") => {
            let mut v = vec![
                name,
                col("Status", "string", 0, "Status of the job."),
                col(
                    "Completions",
                    "string",
                    0,
                    "The completion status of the job.",
                ),
                col(
                    "Duration",
                    "string",
                    0,
                    "Time required to complete the job.",
                ),
                age,
            ];
            v.extend(template_columns());
            v
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            vec![
                name,
                col("Created At", "date", 0, "Creation time of the CRD"),
            ]
        }
        _ if rt.builtin || rt.columns.is_empty() => vec![name, age],
        _ => {
            let mut cols = vec![name];
            for c in &rt.columns {
                let t = if c.type_ == "date" {
                    "string"
                } else {
                    c.type_.as_str()
                };
                cols.push(json!({"name": c.name, "type": t, "format": c.format, "description": c.description, "priority": c.priority}));
            }
            cols
        }
    }
}

/// The wide columns of the workload kinds.
fn template_columns() -> Vec<Value> {
    vec![
        col(
            "Containers",
            "string",
            1,
            "Names of each container in the template.",
        ),
        col(
            "Images",
            "string",
            1,
            "Images referenced by each container in the template.",
        ),
        col("Selector", "string", 1, "Label selector for pods."),
    ]
}

/// The cells of [`template_columns`].
fn template_cells(o: &Value) -> Vec<Value> {
    let containers = o["spec"]["template"]["spec"]["containers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let names: Vec<String> = containers.iter().map(|c| s(&c["name"])).collect();
    let images: Vec<String> = containers.iter().map(|c| s(&c["image"])).collect();
    vec![
        json!(names.join(",")),
        json!(images.join(",")),
        json!(pairs(&o["spec"]["selector"]["matchLabels"])),
    ]
}

/// kube-apiserver's Job status column: the terminal condition, else Suspended/Running.
fn job_status(o: &Value) -> &'static str {
    let conds = o["status"]["conditions"].as_array();
    let has = |t: &str| {
        conds.is_some_and(|cs| cs.iter().any(|c| c["type"] == t && c["status"] == "True"))
    };
    if has("Complete") {
        "Complete"
    } else if has("Failed") {
        "Failed"
    } else if o["metadata"]["deletionTimestamp"].is_string() {
        "Terminating"
    } else if has("Suspended") {
        "Suspended"
    } else {
        "Running"
    }
}

fn pod_status(o: &Value) -> String {
    if o["metadata"]["deletionTimestamp"].is_string() {
        return "Terminating".into();
    }
    let mut reason = s(&o["status"]["reason"]);
    if reason.is_empty() {
        reason = s(&o["status"]["phase"]);
    }
    let statuses = o["status"]["containerStatuses"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for cs in statuses.iter().rev() {
        let waiting = s(&cs["state"]["waiting"]["reason"]);
        let terminated = s(&cs["state"]["terminated"]["reason"]);
        if !waiting.is_empty() {
            reason = waiting;
        } else if !terminated.is_empty() && !cs["state"]["running"].is_object() {
            reason = terminated;
        }
    }
    if reason.is_empty() {
        "Pending".into()
    } else {
        reason
    }
}

fn cells(rt: &ResourceType, o: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = o["metadata"]["name"].clone();
    let created = age(&o["metadata"]["creationTimestamp"], now);
    match (rt.group.as_str(), rt.kind.as_str()) {
        ("", "Pod") => {
            let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
            let statuses = o["status"]["containerStatuses"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let ready = statuses.iter().filter(|c| c["ready"] == true).count();
            let restarts: i64 = statuses
                .iter()
                .filter_map(|c| c["restartCount"].as_i64())
                .sum();
            let gates = o["spec"]["readinessGates"].as_array().map_or(0, Vec::len);
            vec![
                name,
                json!(format!("{ready}/{total}")),
                json!(pod_status(o)),
                json!(restarts),
                created,
                or_none(&o["status"]["podIP"]),
                or_none(&o["spec"]["nodeName"]),
                or_none(&o["status"]["nominatedNodeName"]),
                json!(if gates == 0 {
                    "<none>".to_string()
                } else {
                    format!("0/{gates}")
                }),
            ]
        }
        ("", "Node") => {
            let ready = o["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| match c["status"].as_str() {
                    Some("True") => "Ready",
                    Some("False") => "NotReady",
                    _ => "Unknown",
                })
                .unwrap_or("Unknown");
            let mut status = ready.to_string();
            if o["spec"]["unschedulable"] == true {
                status.push_str(",SchedulingDisabled");
            }
            let mut roles: Vec<String> = o["metadata"]["labels"]
                .as_object()
                .map(|l| {
                    l.keys()
                        .filter_map(|k| {
                            k.strip_prefix("node-role.kubernetes.io/").map(String::from)
                        })
                        .collect()
                })
                .unwrap_or_default();
            roles.sort();
            let addr = |t: &str| {
                o["status"]["addresses"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["type"] == t))
                    .map(|x| x["address"].clone())
                    .unwrap_or(Value::Null)
            };
            let info = &o["status"]["nodeInfo"];
            vec![
                name,
                json!(status),
                json!(if roles.is_empty() {
                    "<none>".to_string()
                } else {
                    roles.join(",")
                }),
                created,
                json!(s(&info["kubeletVersion"])),
                or_none(&addr("InternalIP")),
                or_none(&addr("ExternalIP")),
                or_none(&info["osImage"]),
                or_none(&info["kernelVersion"]),
                or_none(&info["containerRuntimeVersion"]),
            ]
        }
        ("", "Namespace") => vec![name, json!(s(&o["status"]["phase"])), created],
        ("", "ConfigMap") => {
            let n = o["data"].as_object().map_or(0, |m| m.len())
                + o["binaryData"].as_object().map_or(0, |m| m.len());
            vec![name, json!(n), created]
        }
        ("", "Secret") => {
            let n = o["data"].as_object().map_or(0, |m| m.len());
            let t = if o["type"].is_string() {
                s(&o["type"])
            } else {
                "Opaque".into()
            };
            vec![name, json!(t), json!(n), created]
        }
        ("", "Service") => {
            let ports: Vec<String> = o["spec"]["ports"]
                .as_array()
                .map(|ps| {
                    ps.iter()
                        .map(|p| {
                            let proto = p["protocol"].as_str().unwrap_or("TCP");
                            match p["nodePort"].as_i64() {
                                Some(np) => format!("{}:{np}/{proto}", p["port"]),
                                None => format!("{}/{proto}", p["port"]),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            let selector = pairs(&o["spec"]["selector"]);
            let external: Vec<String> = o["spec"]["externalIPs"]
                .as_array()
                .map(|a| a.iter().map(s).collect())
                .unwrap_or_default();
            vec![
                name,
                json!(o["spec"]["type"].as_str().unwrap_or("ClusterIP")),
                or_none(&o["spec"]["clusterIP"]),
                json!(if external.is_empty() {
                    "<none>".to_string()
                } else {
                    external.join(",")
                }),
                json!(if ports.is_empty() {
                    "<none>".to_string()
                } else {
                    ports.join(",")
                }),
                created,
                or_none(&json!(selector)),
            ]
        }
        ("", "Endpoints") => {
            let mut eps = Vec::new();
            for subset in o["subsets"].as_array().into_iter().flatten() {
                for a in subset["addresses"].as_array().into_iter().flatten() {
                    let ports = subset["ports"].as_array().cloned().unwrap_or_default();
                    if ports.is_empty() {
                        eps.push(s(&a["ip"]));
                    }
                    for p in ports {
                        eps.push(format!("{}:{}", s(&a["ip"]), p["port"]));
                    }
                }
            }
            vec![
                name,
                json!(if eps.is_empty() {
                    "<none>".to_string()
                } else {
                    eps.join(",")
                }),
                created,
            ]
        }
        ("", "Event") => {
            let last = [
                &o["lastTimestamp"],
                &o["eventTime"],
                &o["metadata"]["creationTimestamp"],
            ]
            .into_iter()
            .find(|v| v.is_string())
            .cloned()
            .unwrap_or(Value::Null);
            let obj = &o["involvedObject"];
            vec![
                age(&last, now),
                json!(s(&o["type"])),
                json!(s(&o["reason"])),
                json!(format!(
                    "{}/{}",
                    s(&obj["kind"]).to_lowercase(),
                    s(&obj["name"])
                )),
                json!(s(&o["message"])),
            ]
        }
        ("", "ServiceAccount") => vec![
            name,
            json!(o["secrets"].as_array().map_or(0, Vec::len)),
            created,
        ],
        ("coordination.k8s.io", "Lease") => {
            vec![name, or_none(&o["spec"]["holderIdentity"]), created]
        }
        ("apps", "Deployment") => {
            let st = &o["status"];
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            let mut v = vec![
                name,
                json!(format!(
                    "{}/{}",
                    n(&st["readyReplicas"]),
                    n(&o["spec"]["replicas"])
                )),
                json!(n(&st["updatedReplicas"])),
                json!(n(&st["availableReplicas"])),
                created,
            ];
            v.extend(template_cells(o));
            v
        }
        ("apps", "ReplicaSet") => {
            let st = &o["status"];
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            let mut v = vec![
                name,
                json!(n(&o["spec"]["replicas"])),
                json!(n(&st["replicas"])),
                json!(n(&st["readyReplicas"])),
                created,
            ];
            v.extend(template_cells(o));
            v
        }
        ("apps", "DaemonSet") => {
            let st = &o["status"];
            let n = |v: &Value| v.as_i64().unwrap_or(0);
            let selector = pairs(&o["spec"]["template"]["spec"]["nodeSelector"]);
            let mut v = vec![
                name,
                json!(n(&st["desiredNumberScheduled"])),
                json!(n(&st["currentNumberScheduled"])),
                json!(n(&st["numberReady"])),
                json!(n(&st["updatedNumberScheduled"])),
                json!(n(&st["numberAvailable"])),
                or_none(&json!(selector)),
                created,
            ];
            v.extend(template_cells(o));
            v
        }
        ("batch", "Job") => {
            let st = &o["status"];
            let succeeded = st["succeeded"].as_i64().unwrap_or(0);
            let completions = match o["spec"]["completions"].as_i64() {
                Some(c) => format!("{succeeded}/{c}"),
                None => match o["spec"]["parallelism"].as_i64().unwrap_or(1) {
                    p if p > 1 => format!("{succeeded}/1 of {p}"),
                    _ => format!("{succeeded}/1"),
                },
            };
            let ts = |v: &Value| {
                v.as_str()
                    .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                    .map(|t| t.with_timezone(&Utc))
            };
            let duration = match (ts(&st["startTime"]), ts(&st["completionTime"])) {
                (Some(a), Some(b)) => human_duration((b - a).num_seconds()),
                (Some(a), None) => human_duration((now - a).num_seconds()),
                _ => String::new(),
            };
            let mut v = vec![
                name,
                json!(job_status(o)),
                json!(completions),
                json!(duration),
                created,
            ];
            v.extend(template_cells(o));
            v
        }
        ("apiextensions.k8s.io", "CustomResourceDefinition") => {
            vec![name, o["metadata"]["creationTimestamp"].clone()]
        }
        _ if rt.builtin || rt.columns.is_empty() => vec![name, created],
        _ => {
            let mut out = vec![name];
            for c in &rt.columns {
                let found = json_path(o, &c.json_path);
                let v = match found.as_slice() {
                    [] => Value::Null,
                    [one] if c.type_ == "date" => age(one, now),
                    [one] => (*one).clone(),
                    many => json!(many.iter().map(|v| s(v)).collect::<Vec<_>>().join(",")),
                };
                out.push(v);
            }
            out
        }
    }
}

/// What a row carries besides its cells; takes the object apart rather than copying it (a list
/// of 100,000 pods copied each pod's metadata here).
fn row_object(o: Value, include: IncludeObject) -> Option<Value> {
    match include {
        IncludeObject::None => None,
        IncludeObject::Object => Some(o),
        IncludeObject::Metadata => {
            let mut partial = ops::partial_metadata(o);
            if let Some(m) = partial["metadata"].as_object_mut() {
                m.remove("managedFields");
            }
            Some(partial)
        }
    }
}

/// Renders objects as a `meta.k8s.io/v1` Table.
pub fn render(
    rt: &ResourceType,
    objects: Vec<Value>,
    list_meta: Value,
    include: IncludeObject,
    headers: bool,
) -> Value {
    let now = Utc::now();
    let rows: Vec<Value> = objects
        .into_iter()
        .map(|o| {
            let cells = Value::Array(cells(rt, &o, now));
            match row_object(o, include) {
                Some(obj) => ops::object([("cells", cells), ("object", obj)]),
                None => ops::object([("cells", cells)]),
            }
        })
        .collect();
    let mut table = ops::object([
        ("kind", json!("Table")),
        ("apiVersion", json!("meta.k8s.io/v1")),
        ("metadata", list_meta),
        ("rows", Value::Array(rows)),
    ]);
    if headers {
        table["columnDefinitions"] = Value::Array(columns(rt));
    } else {
        table["columnDefinitions"] = Value::Null;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_kubectl() {
        assert_eq!(human_duration(5), "5s");
        assert_eq!(human_duration(125), "2m5s");
        assert_eq!(human_duration(600), "10m");
        assert_eq!(human_duration(3 * 3600 + 60), "3h1m");
        assert_eq!(human_duration(30 * 3600), "30h");
        assert_eq!(human_duration(3 * 86400 + 3600), "3d1h");
        assert_eq!(human_duration(100 * 86400), "100d");
    }

    #[test]
    fn json_path_subset() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}],
                                  "list": [{"n": 1}, {"n": 2}]}});
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![&json!("True")]
        );
        assert_eq!(json_path(&o, ".status.list[1].n"), vec![&json!(2)]);
        assert_eq!(json_path(&o, ".status.list[*].n").len(), 2);
        assert!(json_path(&o, ".status.missing").is_empty());
        assert_eq!(
            json_path(&o, ".status.conditions[-1:].type"),
            vec![&json!("Ready")]
        );
        assert_eq!(json_path(&o, ".status.list[-2].n"), vec![&json!(1)]);
        assert!(json_path(&o, ".status.list[-3].n").is_empty());
    }

    #[test]
    fn pod_row() {
        let rt = crate::registry::Registry::default()
            .snapshot()
            .get("", "v1", "pods")
            .unwrap();
        let pod = json!({"metadata": {"name": "p", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "nodeName": "edge-1"},
            "status": {"phase": "Running", "containerStatuses": [
                {"ready": true, "restartCount": 2, "state": {"running": {}}},
                {"ready": false, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}});
        let t = render(&rt, vec![pod], json!({}), IncludeObject::Metadata, true);
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "CrashLoopBackOff");
        assert_eq!(cells[3], 3);
        assert_eq!(cells[6], "edge-1");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
        assert_eq!(t["rows"][0]["object"]["metadata"]["name"], "p");
        assert_eq!(t["columnDefinitions"][0]["format"], "name");
    }
}
