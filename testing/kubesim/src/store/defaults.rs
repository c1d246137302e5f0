//! Defaulting: the little that the apiserver's strategies and controllers fill in and clients
//! rely on (namespace phase and labels, service IPs, secret data, replicas, CRD status), and
//! the contents every new namespace gets.

use serde_json::{Value, json};

use super::{CONTROL_PLANE, State, Target, is_deleting, meta_str, metadata_mut, now};
use crate::resources::{CRD_GROUP, CRD_PLURAL};

impl State {
    /// The little defaulting real controllers and strategies would do that clients rely on.
    pub(super) fn default_fields(
        &mut self,
        target: &Target,
        current: Option<&Value>,
        object: &mut Value,
    ) {
        let rt = &target.rt;
        match (rt.group.as_str(), rt.plural.as_str()) {
            ("", "namespaces") => {
                let name = meta_str(object, "name").unwrap_or_default().to_string();
                let meta = metadata_mut(object);
                let labels = meta.entry("labels").or_insert_with(|| json!({}));
                if labels.is_object() {
                    labels["kubernetes.io/metadata.name"] = json!(name);
                }
                if object.pointer("/spec/finalizers").is_none() {
                    object["spec"] = json!({ "finalizers": ["kubernetes"] });
                }
                let phase = if current.is_some_and(is_deleting) {
                    "Terminating"
                } else {
                    "Active"
                };
                if !object.get("status").is_some_and(Value::is_object) {
                    object["status"] = json!({});
                }
                object["status"]["phase"] = json!(phase);
            }
            ("", "services") => {
                let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
                    return;
                };
                let kind = spec
                    .entry("type")
                    .or_insert_with(|| json!("ClusterIP"))
                    .clone();
                spec.entry("sessionAffinity")
                    .or_insert_with(|| json!("None"));
                if kind != "ExternalName" && !spec.contains_key("clusterIP") {
                    let ip = match current.and_then(|c| c.pointer("/spec/clusterIP")) {
                        Some(ip) => ip.clone(),
                        None => {
                            let n = self.next_service_ip;
                            self.next_service_ip += 1;
                            json!(format!("10.96.{}.{}", (n / 250) % 250, n % 250 + 1))
                        }
                    };
                    spec.insert("clusterIPs".into(), json!([ip.clone()]));
                    spec.insert("clusterIP".into(), ip);
                }
                for port in spec
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(port) = port.as_object_mut() {
                        port.entry("protocol").or_insert_with(|| json!("TCP"));
                        if let Some(number) = port.get("port").cloned() {
                            port.entry("targetPort").or_insert(number);
                        }
                    }
                }
            }
            ("", "secrets") => {
                // stringData is write-only: the apiserver folds it into data.
                if let Some(Value::Object(string_data)) =
                    object.as_object_mut().and_then(|o| o.remove("stringData"))
                {
                    if !object.get("data").is_some_and(Value::is_object) {
                        object["data"] = json!({});
                    }
                    for (key, value) in string_data {
                        if let Some(text) = value.as_str() {
                            object["data"][key] = json!(base64(text.as_bytes()));
                        }
                    }
                }
                if object.get("type").is_none_or(Value::is_null) {
                    object["type"] = json!("Opaque");
                }
            }
            ("apps", "deployments" | "statefulsets") => {
                if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.entry("replicas").or_insert_with(|| json!(1));
                }
            }
            (CRD_GROUP, CRD_PLURAL) => {
                let names = object
                    .pointer("/spec/names")
                    .filter(|n| n.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({}));
                let mut accepted = names.clone();
                if let Some(kind) = names.get("kind").and_then(Value::as_str) {
                    accepted["singular"] = names
                        .get("singular")
                        .cloned()
                        .unwrap_or_else(|| json!(kind.to_lowercase()));
                    accepted["listKind"] = names
                        .get("listKind")
                        .cloned()
                        .unwrap_or_else(|| json!(format!("{kind}List")));
                }
                let storage: Vec<Value> = object
                    .pointer("/spec/versions")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                    .filter_map(|v| v.get("name").cloned())
                    .collect();
                let mut stored_versions: Vec<Value> = current
                    .and_then(|c| c.pointer("/status/storedVersions"))
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for v in storage {
                    if !stored_versions.contains(&v) {
                        stored_versions.push(v);
                    }
                }
                let condition = |kind: &str, reason: &str, message: &str| {
                    let since = current
                        .and_then(|c| c.pointer("/status/conditions"))
                        .and_then(Value::as_array)
                        .and_then(|cs| cs.iter().find(|c| c["type"] == kind))
                        .and_then(|c| c.get("lastTransitionTime").cloned())
                        .unwrap_or_else(|| json!(now()));
                    json!({ "type": kind, "status": "True", "reason": reason, "message": message, "lastTransitionTime": since })
                };
                object["status"] = json!({
                    "conditions": [
                        condition("NamesAccepted", "NoConflicts", "no conflicts found"),
                        condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
                    ],
                    "acceptedNames": accepted,
                    "storedVersions": stored_versions,
                });
            }
            _ => {}
        }
    }

    /// What the service-account and root-CA controllers put into every new namespace.
    pub(super) fn populate_namespace(&mut self, namespace: &str) {
        let service_accounts = self.target_for(
            |t| t.group.is_empty() && t.plural == "serviceaccounts",
            Some(namespace),
        );
        let config_maps = self.target_for(
            |t| t.group.is_empty() && t.plural == "configmaps",
            Some(namespace),
        );
        let account = json!({ "metadata": { "name": "default" } });
        let root_ca = json!({
            "metadata": { "name": "kube-root-ca.crt", "annotations": { "kubernetes.io/description": "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters." } },
            "data": { "ca.crt": "-----BEGIN CERTIFICATE-----\nkubesim has no CA: it serves plain HTTP\n-----END CERTIFICATE-----\n" },
        });
        for (target, object) in [(service_accounts, account), (config_maps, root_ca)] {
            if let Err(err) = self.create(&target, object, CONTROL_PLANE, false) {
                tracing::warn!("populating namespace {namespace}: {err}");
            }
        }
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selectors::{FieldSelector, LabelSelector};
    use crate::store::fixtures::*;

    #[test]
    fn base64_matches_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"hunter2"), "aHVudGVyMg==");
    }

    #[test]
    fn bootstraps_namespaces_with_their_default_contents() {
        let store = store();
        let state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let names: Vec<String> = state
            .list(&cms, &LabelSelector::default(), &FieldSelector::default())
            .iter()
            .filter_map(|o| meta_str(o, "name").map(String::from))
            .collect();
        assert_eq!(names, ["kube-root-ca.crt"]);
    }
}
