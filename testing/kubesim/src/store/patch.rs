//! PATCH in its four forms: JSON merge, JSON patch, strategic merge (approximated by a merge
//! patch) and server-side apply.

use serde_json::Value;

use super::write::check_body_identity;
use super::{Ownership, PatchType, State, Target, meta_str, now};
use crate::apply::{self, Writer};
use crate::schema;
use crate::status::{ApiError, Cause};
use crate::typed;

impl State {
    /// PATCH in any of its four forms. Returns the object and whether it was created (by apply).
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        target: &Target,
        name: &str,
        patch_type: PatchType,
        body: &[u8],
        manager: Option<&str>,
        subresource: &str,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let current = self.get(target, name);
        if let PatchType::Apply { force } = patch_type {
            let manager = manager.ok_or_else(|| {
                ApiError::invalid(
                    "PatchOptions.meta.k8s.io",
                    "meta.k8s.io",
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired",
                        message: "Required value: is required for apply patch".into(),
                        field: "fieldManager".into(),
                    }],
                )
            })?;
            return self.server_side_apply(
                target,
                name,
                current.ok(),
                body,
                manager,
                force,
                subresource,
                dry_run,
            );
        }
        let current = current?;
        let mut patched = current.clone();
        match patch_type {
            PatchType::Merge | PatchType::Strategic => {
                let patch: Value = serde_json::from_slice(body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
                if !patch.is_object() {
                    return Err(ApiError::bad_request("patch body must be a JSON object"));
                }
                json_patch::merge(&mut patched, &patch);
                if patch_type == PatchType::Strategic {
                    strip_directives(&mut patched);
                }
            }
            PatchType::Json => {
                let mut patch: json_patch::Patch = serde_json::from_slice(body).map_err(|e| {
                    ApiError::bad_request(format!("error decoding JSON patch: {e}"))
                })?;
                // The API server's JSON patch treats a missing field as null, so
                // `test <missing path> == null` passes (kube's finalizer helper relies on it).
                patch.0.retain(|op| match op {
                    json_patch::PatchOperation::Test(test) => {
                        !(test.value.is_null() && patched.pointer(test.path.as_str()).is_none())
                    }
                    _ => true,
                });
                json_patch::patch(&mut patched, &patch).map_err(|e| {
                    target.invalid(
                        name,
                        vec![Cause {
                            reason: "FieldValueInvalid",
                            message: format!("the JSON patch could not be applied: {e}"),
                            field: String::new(),
                        }],
                    )
                })?;
            }
            PatchType::Apply { .. } => unreachable!("handled above"),
        }
        if !patched.is_object() {
            return Err(ApiError::bad_request(
                "the patched document is not an object",
            ));
        }
        if let Some(error) = typed::check(&target.rt, &patched).first() {
            return Err(typed::patch_error(&patched, error));
        }
        check_body_identity(target, name, &patched)?;
        if meta_str(&patched, "resourceVersion") != meta_str(&current, "resourceVersion") {
            return Err(ApiError::stale(target.rt.reference(), name));
        }
        let manager = manager.unwrap_or("unknown").to_string();
        let object = self.write(
            target,
            Some(current),
            patched,
            Ownership::Update(manager),
            subresource,
            dry_run,
        )?;
        Ok((object, false))
    }

    #[allow(clippy::too_many_arguments)]
    fn server_side_apply(
        &mut self,
        target: &Target,
        name: &str,
        current: Option<Value>,
        body: &[u8],
        manager: &str,
        force: bool,
        subresource: &str,
        dry_run: bool,
    ) -> Result<(Value, bool), ApiError> {
        let config: Value = serde_json::from_slice(body)
            .or_else(|_| serde_yaml::from_slice(body))
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
        for (field, expected) in [
            ("apiVersion", target.api_version()),
            ("kind", target.rt.kind.clone()),
        ] {
            match config.get(field).and_then(Value::as_str) {
                Some(actual) if actual == expected => {}
                Some(actual) => {
                    return Err(ApiError::bad_request(format!(
                        "{field} {actual:?} does not match the expected {expected:?}"
                    )));
                }
                None => {
                    return Err(ApiError::bad_request(format!(
                        "invalid object: {field} must be set in an apply configuration"
                    )));
                }
            }
        }
        let mut messages = typed::smd_messages(&typed::check(&target.rt, &config));
        // Custom resources: structured-merge-diff types the configuration with the CRD's
        // schema, so a field it does not declare is refused whatever `fieldValidation` says.
        if let Some(schema) = target
            .rt
            .custom
            .as_ref()
            .and_then(|c| c.schemas.get(&target.version))
        {
            messages.extend(
                schema::undeclared_fields(schema, &config)
                    .iter()
                    .map(|path| format!("{path}: field not declared in schema")),
            );
        }
        if !messages.is_empty() {
            let namespace = target.namespace.as_deref().unwrap_or_default();
            return Err(typed::apply_error(
                &target.rt,
                &target.version,
                namespace,
                name,
                &messages,
            ));
        }
        check_body_identity(target, name, &config)?;
        if meta_str(&config, "name").is_none() {
            return Err(ApiError::bad_request(
                "metadata.name must be set in an apply configuration",
            ));
        }
        if let Some(rv) = meta_str(&config, "resourceVersion")
            && current
                .as_ref()
                .and_then(|c| meta_str(c, "resourceVersion"))
                != Some(rv)
        {
            return Err(match current {
                Some(_) => ApiError::stale(target.rt.reference(), name),
                None => target.not_found(name),
            });
        }
        if current.is_none() && subresource == "status" {
            return Err(target.not_found(name));
        }
        let api_version = target.api_version();
        let time = now();
        let writer = Writer {
            manager,
            api_version: &api_version,
            subresource,
            status_subresource: target.rt.status_subresource,
            now: &time,
        };
        let (merged, entries) = apply::apply(current.as_ref(), &config, &writer, force)
            .map_err(|c| apply::conflict_error(&c))?;
        let created = current.is_none();
        let object = self.write(
            target,
            current,
            merged,
            Ownership::Applied(entries),
            subresource,
            dry_run,
        )?;
        Ok((object, created))
    }
}

/// Removes strategic-merge-patch directives (`$patch`, `$setElementOrder/...`, `$retainKeys`)
/// that our merge-patch approximation leaves behind.
fn strip_directives(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('$'));
            map.values_mut().for_each(strip_directives);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_directives),
        _ => {}
    }
}
