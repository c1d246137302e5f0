//! A fresh, migrated PostgreSQL database for every test, so tests run in parallel
//! without seeing each other's rows.
//!
//! The server is, in order of preference: `$DATABASE_URL`; the local server at
//! `postgres://postgres@127.0.0.1:5432/postgres`; or a private server this crate
//! starts with `initdb`/`pg_ctl` in the temp dir (shared by every test process of the
//! machine, and left running for the next run). `BROKKR_TESTDB_PRIVATE=1` forces the
//! private server.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection};
use tokio::sync::OnceCell;

const LOCAL_SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Port of the private server; unusual so that it never meets a real one.
const PRIVATE_PORT: u16 = 54329;

/// One test's database: created on [`TestDb::new`], dropped (with its connections)
/// when this value is dropped.
pub struct TestDb {
    conn: DatabaseConnection,
    url: String,
    name: String,
    admin_url: String,
}

impl TestDb {
    /// A new database with every Brokkr migration applied.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        brokkr_migrations::migrate_with_lock(&db.conn)
            .await
            .expect("failed to apply migrations to the test database");
        db
    }

    /// A new database without any schema, for migration tests.
    pub async fn empty() -> TestDb {
        let admin_url = server_url().await.to_owned();
        let name = format!("brokkr_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&admin_url).await;
        admin
            .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("failed to create the test database");
        admin.close().await.ok();
        let url = with_database(&admin_url, &name);
        let conn = connect(&url).await;
        TestDb {
            conn,
            url,
            name,
            admin_url,
        }
    }

    pub fn conn(&self) -> &DatabaseConnection {
        &self.conn
    }

    /// URL of this test's database, for processes the test starts.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Makes the database unreachable as an outage would: every connection to it is
    /// ended and new ones are refused (superusers included) until
    /// [`TestDb::accept_connections`]. The server and other tests' databases go on.
    pub async fn refuse_connections(&self) {
        self.admin(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false; \
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            name = self.name
        ))
        .await;
    }

    /// Ends every connection to the database, as a PostgreSQL restart or a network
    /// partition would; new connections are accepted at once.
    pub async fn terminate_connections(&self) -> u64 {
        let admin = connect(&self.admin_url).await;
        let terminated = admin
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'",
                    self.name
                ),
            ))
            .await
            .expect("terminate the test database's connections")
            .len() as u64;
        admin.close().await.ok();
        terminated
    }

    /// Ends a [`TestDb::refuse_connections`] outage.
    pub async fn accept_connections(&self) {
        self.admin(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            self.name
        ))
        .await;
    }

    async fn admin(&self, sql: &str) {
        let admin = connect(&self.admin_url).await;
        admin
            .execute_unprepared(sql)
            .await
            .unwrap_or_else(|e| panic!("failed to run {sql:?} on the test server: {e}"));
        admin.close().await.ok();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot be blocked on; a helper
        // thread with its own runtime does the async work.
        let dropper = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("failed to build a runtime to drop the test database");
            runtime.block_on(async move {
                if let Ok(admin) = Database::connect(quiet(&admin_url)).await {
                    let _ = admin
                        .execute_unprepared(&format!(
                            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                        ))
                        .await;
                    admin.close().await.ok();
                }
            });
        });
        let _ = dropper.join();
    }
}

fn quiet(url: &str) -> ConnectOptions {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(8)
        .connect_timeout(Duration::from_secs(10))
        .sqlx_logging(false);
    options
}

async fn connect(url: &str) -> DatabaseConnection {
    Database::connect(quiet(url))
        .await
        .unwrap_or_else(|err| panic!("failed to connect to the test PostgreSQL: {err}"))
}

/// `url` with its database path replaced by `database`.
fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// URL of a server where tests may create databases; found or started once per process.
pub async fn server_url() -> &'static str {
    static URL: OnceCell<String> = OnceCell::const_new();
    URL.get_or_init(|| async {
        // Lets a developer (or CI) prove the private-server fallback on a machine
        // that also has a server running.
        let private_only = std::env::var_os("BROKKR_TESTDB_PRIVATE").is_some();
        if !private_only {
            if let Ok(url) = std::env::var("DATABASE_URL") {
                return url;
            }
            if reachable(LOCAL_SERVER_URL).await {
                return LOCAL_SERVER_URL.to_owned();
            }
        }
        let url = tokio::task::spawn_blocking(start_private_server)
            .await
            .expect("the private PostgreSQL starter panicked");
        assert!(
            reachable(&url).await,
            "started a private PostgreSQL but cannot connect to {url}"
        );
        url
    })
    .await
}

async fn reachable(url: &str) -> bool {
    let mut options = quiet(url);
    options.connect_timeout(Duration::from_secs(2));
    match Database::connect(options).await {
        Ok(conn) => {
            let ok = conn.execute_unprepared("SELECT 1").await.is_ok();
            conn.close().await.ok();
            ok
        }
        Err(_) => false,
    }
}

/// Starts (or reuses) a private server under the temp dir and returns its URL.
/// A file lock serialises test processes racing to start it.
fn start_private_server() -> String {
    let bin = postgres_bin_dir().expect(
        "no PostgreSQL reachable (DATABASE_URL unset, nothing on 127.0.0.1:5432) and no initdb \
         on PATH or under /usr/lib/postgresql/*/bin: install PostgreSQL or set DATABASE_URL",
    );
    let root = std::env::temp_dir().join("brokkr-testdb-postgres");
    std::fs::create_dir_all(&root).expect("failed to create the private PostgreSQL dir");
    let lock = std::fs::File::create(root.join("lock")).expect("failed to create the lock file");
    lock.lock()
        .expect("failed to lock the private PostgreSQL dir");

    let data = root.join("data");
    let url = format!("postgres://postgres@127.0.0.1:{PRIVATE_PORT}/postgres");
    let as_root = is_root();
    if as_root {
        // PostgreSQL refuses to run as root; the distribution's `postgres` user runs it.
        let mut chown = Command::new("chown");
        chown.args(["-R", "postgres:postgres"]).arg(&root);
        run(chown);
    }
    if !data.join("PG_VERSION").exists() {
        run(server_command(
            as_root,
            &bin.join("initdb"),
            &[
                "-D",
                path_str(&data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
            ],
        ));
    }
    let status = server_command(
        as_root,
        &bin.join("pg_ctl"),
        &["-D", path_str(&data), "status"],
    )
    .output()
    .expect("failed to run pg_ctl status");
    if !status.status.success() {
        let options = format!(
            "-p {PRIVATE_PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off -c max_connections=200",
            path_str(&root)
        );
        run(server_command(
            as_root,
            &bin.join("pg_ctl"),
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&root.join("server.log")),
                "-o",
                &options,
                "-w",
                "start",
            ],
        ));
    }
    drop(lock);
    url
}

fn server_command(as_root: bool, program: &Path, args: &[&str]) -> Command {
    if as_root {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

fn run(mut command: Command) {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("failed to run {command:?}: {err}"));
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp dir path is not UTF-8")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn postgres_bin_dir() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_replaces_the_path_and_keeps_the_query() {
        assert_eq!(
            with_database("postgres://u:p@h:5/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t2"), "postgres://h/t2");
    }

    #[tokio::test]
    async fn each_test_database_is_fresh_and_dropped_afterwards() {
        let db = TestDb::new().await;
        let name = db.name.clone();
        db.conn()
            .execute_unprepared("SELECT count(*) FROM stacks")
            .await
            .expect("migrated schema has a stacks table");
        drop(db);
        let admin = connect(server_url().await).await;
        let row = admin
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*) AS n FROM pg_database WHERE datname = $1",
                [name.into()],
            ))
            .await
            .expect("query pg_database")
            .expect("one row");
        let remaining: i64 = row.try_get("", "n").expect("count");
        assert_eq!(remaining, 0, "the test database is dropped with its TestDb");
    }
}
