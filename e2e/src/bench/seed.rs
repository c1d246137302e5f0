//! The bench's rows, written straight into the hub's database (no custom resources):
//! a generator, stacks with deployment objects, agents with keys, targets, and past
//! events. Small things go through the operator's store; the large ones (thousands of
//! agents, millions of events) through bulk SQL.

use std::collections::BTreeSet;

use brokkr_operator::keys::issue_key;
use brokkr_operator::render::render_manifests;
use brokkr_operator::store::{GeneratorSync, StackContent, StackSync, Store};
use sea_orm::{ConnectionTrait, DbBackend, Statement, Value};
use uuid::Uuid;

use super::{BenchError, During};

/// One agent row and its key.
#[derive(Clone, Debug)]
pub struct SeededAgent {
    pub id: Uuid,
    pub name: String,
    pub key: String,
}

#[derive(Clone, Debug)]
pub struct SeededStack {
    pub id: Uuid,
    /// `<namespace>/<name>`; the namespace is also where its objects go on a spoke.
    pub name: String,
    /// The current deployment object.
    pub object: Uuid,
    version: u64,
}

/// A fleet: every stack targeted at every agent.
#[derive(Clone, Debug)]
pub struct Seed {
    pub generator_id: Uuid,
    pub agents: Vec<SeededAgent>,
    pub stacks: Vec<SeededStack>,
    /// Bytes of YAML in each deployment object (roughly).
    object_bytes: usize,
}

/// Agents inserted per statement.
const AGENT_CHUNK: usize = 1000;

const INSERT_AGENTS: &str = r#"
WITH a AS (
    SELECT * FROM jsonb_to_recordset($1::jsonb)
        AS a(id uuid, name text, cluster_name text, pak_prefix text, pak_hash text, resource_uid uuid)
), inserted AS (
    INSERT INTO agents (id, name, cluster_name, resource_uid)
    SELECT id, name, cluster_name, resource_uid FROM a
    RETURNING id
)
INSERT INTO api_keys (id, agent_id, prefix, key_hash, scopes, expires_at)
SELECT gen_random_uuid(), a.id, a.pak_prefix, a.pak_hash, 'agent', now() + interval '90 days'
FROM a JOIN inserted USING (id)
"#;

impl Seed {
    /// `agents` agents and `stacks` stacks, each stack with one deployment object of
    /// about `object_bytes` bytes and targeted at every agent.
    pub async fn fleet(
        store: &Store,
        agents: usize,
        stacks: usize,
        object_bytes: usize,
    ) -> Result<Seed, BenchError> {
        let generator = store
            .upsert_generator(&GeneratorSync {
                resource_uid: Uuid::new_v4(),
                name: "bench",
                description: Some("brokkr-e2e bench"),
                is_active: true,
            })
            .await
            .during("create the bench generator")?;
        let agents = insert_agents(store, agents).await?;
        let agent_ids: BTreeSet<Uuid> = agents.iter().map(|a| a.id).collect();
        let mut seed = Seed {
            generator_id: generator.id,
            agents,
            stacks: Vec::with_capacity(stacks),
            object_bytes,
        };
        for index in 0..stacks {
            let name = format!("bench-{index:02}/fleet");
            let rendered = render_manifests(&manifests(&name, 1, object_bytes))?;
            let synced = store
                .sync_stack(&StackSync {
                    resource_uid: Uuid::new_v4(),
                    name: &name,
                    description: None,
                    generator_id: generator.id,
                    labels: None,
                    annotations: None,
                    content: Some(StackContent {
                        yaml: &rendered.yaml,
                        checksum: &rendered.checksum,
                    }),
                    author: None,
                    progressive: false,
                })
                .await
                .during(format!("create stack {name}"))?;
            let object = synced.deployment_object.ok_or_else(|| {
                BenchError::Setup(format!("stack {name} got no deployment object"))
            })?;
            store
                .replace_stack_targets(synced.stack.id, &agent_ids)
                .await
                .during(format!("target stack {name} at every agent"))?;
            seed.stacks.push(SeededStack {
                id: synced.stack.id,
                name,
                object: object.id,
                version: 1,
            });
        }
        Ok(seed)
    }

    /// The current deployment object of every stack.
    pub fn current_objects(&self) -> Vec<Uuid> {
        self.stacks.iter().map(|s| s.object).collect()
    }

    /// Commits a new deployment object for stack `index` (new content) and returns
    /// its id. The call returns once the transaction is committed.
    pub async fn publish(&mut self, store: &Store, index: usize) -> Result<Uuid, BenchError> {
        let stack = &mut self.stacks[index];
        stack.version += 1;
        let rendered = render_manifests(&manifests(&stack.name, stack.version, self.object_bytes))?;
        let (object, created) = store
            .record_deployment_object(
                stack.id,
                StackContent {
                    yaml: &rendered.yaml,
                    checksum: &rendered.checksum,
                },
            )
            .await
            .during(format!("publish a new version of {}", stack.name))?;
        if !created {
            return Err(BenchError::Setup(format!(
                "version {} of {} was not recorded as new",
                stack.version, stack.name
            )));
        }
        stack.object = object.id;
        Ok(object.id)
    }
}

async fn insert_agents(store: &Store, count: usize) -> Result<Vec<SeededAgent>, BenchError> {
    let mut agents = Vec::with_capacity(count);
    for chunk_start in (0..count).step_by(AGENT_CHUNK) {
        let mut rows = Vec::new();
        for index in chunk_start..count.min(chunk_start + AGENT_CHUNK) {
            let issued = issue_key();
            let agent = SeededAgent {
                id: Uuid::now_v7(),
                name: format!("bench-agent-{index:05}"),
                key: issued.key,
            };
            rows.push(serde_json::json!({
                "id": agent.id,
                "name": agent.name,
                "cluster_name": format!("cluster-{index:05}"),
                "pak_prefix": issued.prefix,
                "pak_hash": issued.hash,
                "resource_uid": Uuid::new_v4(),
            }));
            agents.push(agent);
        }
        store
            .connection()
            .execute_raw(statement(
                INSERT_AGENTS,
                [serde_json::Value::Array(rows).into()],
            ))
            .await
            .during("insert the bench agents")?;
    }
    Ok(agents)
}

/// Agents whose history is inserted per statement.
const HISTORY_CHUNK: usize = 50;

/// `per_agent` events per agent over every deployment object of the fleet, spread
/// over the past minutes, mostly `Health` with an `Apply` every fourth.
const INSERT_HISTORY: &str = r#"
INSERT INTO agent_events
    (id, agent_id, deployment_object_id, event_type, status, message, created_at, updated_at)
SELECT gen_random_uuid(), a.id, d.id,
       CASE WHEN g % 4 = 0 THEN 'Apply' ELSE 'Health' END,
       'Success',
       CASE WHEN g % 4 = 0 THEN NULL ELSE 'healthy: 4 objects ready' END,
       now() - make_interval(mins => g), now() - make_interval(mins => g)
FROM (SELECT jsonb_array_elements_text($1::jsonb)::uuid AS id) a
CROSS JOIN generate_series(1, $2::int) g
JOIN (SELECT id, row_number() OVER (ORDER BY sequence_id) - 1 AS k FROM deployment_objects) d
  ON d.k = g % (SELECT count(*) FROM deployment_objects)
"#;

/// Gives every agent `per_agent` past events, then vacuums and analyzes the table so
/// that the measurement after it meets neither autovacuum nor stale statistics.
/// Returns the number of rows written.
pub async fn history(
    store: &Store,
    agents: &[SeededAgent],
    per_agent: usize,
) -> Result<u64, BenchError> {
    let db = store.connection();
    let mut written = 0;
    for chunk in agents.chunks(HISTORY_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|a| a.id).collect();
        let result = db
            .execute_raw(statement(
                INSERT_HISTORY,
                [
                    serde_json::json!(ids).into(),
                    Value::Int(Some(per_agent as i32)),
                ],
            ))
            .await
            .during("insert past agent events")?;
        written += result.rows_affected();
    }
    db.execute_unprepared("VACUUM ANALYZE agent_events")
        .await
        .during("vacuum agent_events")?;
    Ok(written)
}

fn statement<I>(sql: &str, values: I) -> Statement
where
    I: IntoIterator<Item = Value>,
{
    Statement::from_sql_and_values(DbBackend::Postgres, sql, values)
}

/// A stack's content: a Namespace, a ConfigMap (padded to about `bytes`), a
/// Deployment and a Service, as a platform team would ship a small service.
/// `stack` is `<namespace>/<name>`.
pub fn manifests(stack: &str, version: u64, bytes: usize) -> String {
    let (namespace, name) = stack.split_once('/').unwrap_or(("default", stack));
    let mut yaml = format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {namespace}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    app: {name}
spec:
  replicas: 2
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
      annotations:
        bench.brokkr.io/version: "{version}"
    spec:
      containers:
        - name: web
          image: registry.example.com/{name}:1.{version}.0
          ports:
            - containerPort: 8080
          envFrom:
            - configMapRef:
                name: {name}-config
          resources:
            requests:
              cpu: 50m
              memory: 64Mi
---
apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {namespace}
spec:
  selector:
    app: {name}
  ports:
    - port: 80
      targetPort: 8080
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {name}-config
  namespace: {namespace}
data:
  VERSION: "{version}"
"#
    );
    let mut line = 0;
    while yaml.len() < bytes {
        yaml.push_str(&format!(
            "  SETTING_{line:04}: \"value {line} of version {version} for {name}, padding the object to a realistic size\"\n"
        ));
        line += 1;
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_render_and_change_with_the_version() {
        let one = render_manifests(&manifests("shop/web", 1, 16 * 1024)).unwrap();
        let two = render_manifests(&manifests("shop/web", 2, 16 * 1024)).unwrap();
        assert_eq!(one.objects, 4);
        // Canonical YAML drops some quotes: "about" the size asked for.
        assert!(one.yaml.len() > 15 * 1024, "{}", one.yaml.len());
        assert_ne!(one.checksum, two.checksum);
    }
}
