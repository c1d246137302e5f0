//! Create, replace, and the single write path every change (patch and apply included) goes
//! through: subresource rules, server-owned metadata, names, validation, generation and
//! managedFields.

use serde_json::{Value, json};

use super::{Key, Ownership, State, Target, finalizers, is_deleting, meta_str, metadata_mut, now};
use crate::apply::{self, Writer};
use crate::cel;
use crate::resources::ResourceType;
use crate::schema;
use crate::status::{ApiError, Cause, ResourceRef};
use crate::typed;

impl State {
    pub fn create(
        &mut self,
        target: &Target,
        body: Value,
        manager: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if let Some(error) = typed::check(&target.rt, &body).first() {
            return Err(typed::decode_error(&target.rt, &target.version, error));
        }
        self.write(
            target,
            None,
            body,
            Ownership::Update(manager.to_string()),
            "",
            dry_run,
        )
    }

    /// PUT: replaces the object (or, for `subresource == "status"`, its status).
    pub fn replace(
        &mut self,
        target: &Target,
        name: &str,
        body: Value,
        manager: &str,
        subresource: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        if let Some(error) = typed::check(&target.rt, &body).first() {
            return Err(typed::decode_error(&target.rt, &target.version, error));
        }
        let current = self.get(target, name)?;
        check_body_identity(target, name, &body)?;
        let requested_rv = meta_str(&body, "resourceVersion").unwrap_or_default();
        if requested_rv.is_empty() {
            if target.rt.custom.is_some() {
                return Err(target.invalid(
                    name,
                    vec![Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: 0x0: must be specified for an update".into(),
                        field: "metadata.resourceVersion".into(),
                    }],
                ));
            }
        } else if Some(requested_rv) != meta_str(&current, "resourceVersion") {
            return Err(ApiError::stale(target.rt.reference(), name));
        }
        self.write(
            target,
            Some(current),
            body,
            Ownership::Update(manager.to_string()),
            subresource,
            dry_run,
        )
    }

    /// The single write path: create (`current == None`) or update. Applies the subresource
    /// rules, server-owned metadata, defaulting, validation, generation and managedFields; skips
    /// no-op updates (no new resourceVersion, no event) as the apiserver does.
    pub(super) fn write(
        &mut self,
        target: &Target,
        current: Option<Value>,
        candidate: Value,
        ownership: Ownership,
        subresource: &str,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let rt = &target.rt;
        if !candidate.is_object() {
            return Err(ApiError::bad_request(
                "the request body must be a JSON object",
            ));
        }
        let mut object = match (&current, subresource) {
            (Some(current), "status") => {
                let mut object = current.clone();
                set_or_remove(&mut object, "status", candidate.get("status").cloned());
                object
            }
            (Some(current), _) if rt.status_subresource => {
                let mut object = candidate;
                set_or_remove(&mut object, "status", current.get("status").cloned());
                object
            }
            (None, _) if rt.status_subresource => {
                let mut object = candidate;
                set_or_remove(&mut object, "status", None);
                object
            }
            _ => candidate,
        };
        object["apiVersion"] = json!(target.api_version());
        object["kind"] = json!(rt.kind);

        let name = match &current {
            Some(current) => meta_str(current, "name").unwrap_or_default().to_string(),
            None => self.name_for_create(target, &object)?,
        };
        let key = target.key(&name);
        {
            let meta = metadata_mut(&mut object);
            meta.insert("name".into(), json!(name));
            match &target.namespace {
                Some(ns) if rt.namespaced => meta.insert("namespace".into(), json!(ns)),
                _ => meta.remove("namespace"),
            };
            for server_owned in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
            ] {
                match current
                    .as_ref()
                    .and_then(|c| c.pointer(&format!("/metadata/{server_owned}")))
                {
                    Some(v) => meta.insert(server_owned.into(), v.clone()),
                    None => meta.remove(server_owned),
                };
            }
            meta.remove("selfLink");
            meta.remove("resourceVersion");
            if current.is_none() {
                meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
                meta.insert("creationTimestamp".into(), json!(now()));
            }
        }

        match &current {
            None => self.check_can_create(target, &key)?,
            Some(current) if is_deleting(current) => {
                let before = finalizers(current);
                if finalizers(&object).iter().any(|f| !before.contains(f)) {
                    return Err(target.invalid(
                        &name,
                        vec![Cause {
                            reason: "FieldValueForbidden",
                            message: "Forbidden: no new finalizers can be added if the object is being deleted"
                                .into(),
                            field: "metadata.finalizers".into(),
                        }],
                    ));
                }
            }
            Some(_) => {}
        }

        self.default_fields(target, current.as_ref(), &mut object);
        self.validate(target, &name, &mut object, current.as_ref())?;
        // As the API server: storage finds the name taken only after validation passed.
        if current.is_none() && self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt.reference(), &key.name));
        }

        if rt.tracks_generation {
            let generation = match &current {
                None => 1,
                Some(current) => {
                    let previous = current
                        .pointer("/metadata/generation")
                        .and_then(Value::as_i64)
                        .unwrap_or(1);
                    if spec_part(current, rt.status_subresource)
                        == spec_part(&object, rt.status_subresource)
                    {
                        previous
                    } else {
                        previous + 1
                    }
                }
            };
            metadata_mut(&mut object).insert("generation".into(), json!(generation));
        } else {
            metadata_mut(&mut object).remove("generation");
        }

        let mut entries = match ownership {
            Ownership::Applied(entries) => entries,
            Ownership::Update(manager) => {
                let api_version = target.api_version();
                let time = now();
                let writer = Writer {
                    manager: &manager,
                    api_version: &api_version,
                    subresource,
                    status_subresource: rt.status_subresource,
                    now: &time,
                };
                let previous = current
                    .as_ref()
                    .map(apply::parse_entries)
                    .unwrap_or_default();
                apply::record_update(current.as_ref(), &object, previous, &writer)
            }
        };
        apply::prune(&mut entries, &object);
        if entries.is_empty() {
            metadata_mut(&mut object).remove("managedFields");
        } else {
            metadata_mut(&mut object)
                .insert("managedFields".into(), apply::render_entries(&entries));
        }

        if let Some(current) = &current {
            let mut unchanged = object.clone();
            metadata_mut(&mut unchanged).insert(
                "resourceVersion".into(),
                current
                    .pointer("/metadata/resourceVersion")
                    .cloned()
                    .unwrap_or(Value::Null),
            );
            if unchanged == *current {
                return Ok(target.present(current));
            }
        }
        if dry_run {
            return Ok(target.present(&object));
        }

        let created = current.is_none();
        let stored = self.commit(key.clone(), object);
        if created && rt.is_namespace() {
            self.populate_namespace(&name);
        }
        if self.garbage_possible_after_write(&key) {
            self.collect_garbage();
        }
        Ok(target.present(self.objects.get(&key).unwrap_or(&stored)))
    }

    fn name_for_create(&self, target: &Target, object: &Value) -> Result<String, ApiError> {
        if let Some(ns) = meta_str(object, "namespace")
            && target.rt.namespaced
            && target.namespace.as_deref() != Some(ns)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        match (meta_str(object, "name"), meta_str(object, "generateName")) {
            (Some(name), _) if !name.is_empty() => Ok(name.to_string()),
            (_, Some(prefix)) if !prefix.is_empty() => {
                Ok(format!("{prefix}{}", generated_suffix()))
            }
            _ => Err(target.invalid(
                "",
                vec![
                    validate_name(&target.rt, "")
                        .unwrap_or_else(|| unreachable!("empty names are invalid")),
                ],
            )),
        }
    }

    fn check_can_create(&self, target: &Target, key: &Key) -> Result<(), ApiError> {
        let rt = &target.rt;
        if let Some(cause) = validate_name(rt, &key.name) {
            return Err(target.invalid(&key.name, vec![cause]));
        }
        if rt.namespaced {
            let namespaces = ResourceRef {
                group: "",
                plural: "namespaces",
            };
            let namespace = self
                .namespace_object(&key.namespace)
                .ok_or_else(|| ApiError::not_found(namespaces, &key.namespace))?;
            if is_deleting(namespace) {
                return Err(ApiError::forbidden(format!(
                    "{} {:?} is forbidden: unable to create new content in namespace {} because it is being terminated",
                    rt.plural, key.name, key.namespace
                )));
            }
        }
        if rt.custom.as_ref().is_some_and(|c| c.terminating) {
            return Err(ApiError::method_not_allowed(format!(
                "create not allowed while custom resource definition is terminating: {}",
                rt.custom
                    .as_ref()
                    .map(|c| c.crd_name.as_str())
                    .unwrap_or_default()
            )));
        }
        Ok(())
    }

    fn validate(
        &self,
        target: &Target,
        name: &str,
        object: &mut Value,
        current: Option<&Value>,
    ) -> Result<(), ApiError> {
        let rt = &target.rt;
        let causes = if rt.is_crd() {
            let mut causes = schema::validate_crd(object);
            causes.extend(cel::check_crd(object));
            causes
        } else if let Some(schema) = rt
            .custom
            .as_ref()
            .and_then(|c| c.schemas.get(&target.version))
        {
            schema::prune(schema, object);
            let mut causes = schema::validate(schema, object);
            causes.extend(cel::validate_after(&causes, schema, object, current));
            causes
        } else {
            Vec::new()
        };
        if causes.is_empty() {
            Ok(())
        } else {
            Err(target.invalid(name, causes))
        }
    }
}

/// Everything but metadata (and status, when it is a subresource): what `generation` tracks.
fn spec_part(object: &Value, status_subresource: bool) -> Value {
    let mut part = object.clone();
    if let Value::Object(map) = &mut part {
        map.remove("metadata");
        map.remove("apiVersion");
        map.remove("kind");
        if status_subresource {
            map.remove("status");
        }
    }
    part
}

fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

fn validate_name(rt: &ResourceType, name: &str) -> Option<Cause> {
    if name.is_empty() {
        return Some(Cause {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        });
    }
    let (ok, what) = if rt.is_namespace() || (rt.group.is_empty() && rt.plural == "services") {
        (
            is_dns_label(name),
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        )
    } else {
        (
            is_dns_subdomain(name),
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        )
    };
    (!ok).then(|| Cause {
        reason: "FieldValueInvalid",
        message: format!("Invalid value: {}: {what}", json!(name)),
        field: "metadata.name".into(),
    })
}

fn generated_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .take(5)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn set_or_remove(object: &mut Value, field: &str, value: Option<Value>) {
    if let Value::Object(map) = object {
        match value {
            Some(v) => map.insert(field.to_string(), v),
            None => map.remove(field),
        };
    }
}

/// A body's name and namespace, when given, must be the URL's.
pub(super) fn check_body_identity(
    target: &Target,
    name: &str,
    body: &Value,
) -> Result<(), ApiError> {
    if let Some(body_name) = meta_str(body, "name")
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if let (Some(ns), Some(url_ns)) = (meta_str(body, "namespace"), &target.namespace)
        && target.rt.namespaced
        && !ns.is_empty()
        && ns != url_ns
    {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::store::fixtures::*;

    #[test]
    fn no_op_updates_keep_the_resource_version() {
        let store = store();
        let mut state = store.lock();
        let cms = target(&state, "", "configmaps", Some("default"));
        let created = state
            .create(&cms, config_map("a"), "m", false)
            .expect("create");
        let rv = state.resource_version();
        let replaced = state
            .replace(&cms, "a", created.clone(), "m", "", false)
            .expect("update");
        assert_eq!(
            replaced["metadata"]["resourceVersion"],
            created["metadata"]["resourceVersion"]
        );
        assert_eq!(state.resource_version(), rv);
    }
}
