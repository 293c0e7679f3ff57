//! The operator's CLI (DESIGN.md §7), run as operators run it: the real
//! `tollgate` binary against a fresh SQLite file, checking what it prints, its
//! exit status and what it leaves in the books.
#![allow(
    clippy::unwrap_used,
    reason = "a failed step should stop the test at once, with its output"
)]

use std::process::{Command, Output};

#[path = "common/lock.rs"]
mod lock;
#[path = "common/upstream.rs"]
mod upstream;

/// Runs `tollgate ARGS --database-url URL` in `dir`, with none of the
/// `TOLLGATE_*` variables of the test's own environment, and `password` as
/// `TOLLGATE_PASSWORD` when given.
struct Cli {
    dir: tempfile::TempDir,
}

/// A `tollgate serve` process, killed when dropped, so that a test that fails
/// leaves no server running.
struct Server(std::process::Child);

impl std::ops::Deref for Server {
    type Target = std::process::Child;

    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

/// `tollgate ARGS --database-url URL`, with none of the `TOLLGATE_*` variables
/// of the test's own environment.
fn tollgate_on(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args).args(["--database-url", url]);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    command
}

/// A chat completion of `slow-model` (the model of [`Cli::slow_upstream`]),
/// to the gateway at `base` with the API key `key`.
fn slow_chat(client: &reqwest::Client, base: &str, key: &str) -> reqwest::RequestBuilder {
    client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&serde_json::json!({"model": "slow-model",
            "messages": [{"role": "user", "content": "hi"}]}))
}

impl Server {
    /// Sends SIGTERM, as a service manager stops the server.
    fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Its exit status, once it has exited within `wait`; killed otherwise.
    async fn exited_within(
        &mut self,
        wait: std::time::Duration,
    ) -> Option<std::process::ExitStatus> {
        let step = std::time::Duration::from_millis(100);
        let mut waited = std::time::Duration::ZERO;
        while waited < wait {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            tokio::time::sleep(step).await;
            waited += step;
        }
        self.0.kill().unwrap();
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already gone when the test stopped it.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Cli {
    fn new() -> Cli {
        Cli {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn url(&self) -> String {
        format!("sqlite://{}", self.dir.path().join("tollgate.db").display())
    }

    /// A store on the same database, to look at what commands left there.
    async fn store(&self) -> app::store::SharedStore {
        server::db::connect(&self.url(), server::db::sqlite::Durability::Normal)
            .await
            .unwrap()
    }

    fn run_with(&self, args: &[&str], password: Option<&str>) -> Output {
        self.command(args, password).output().unwrap()
    }

    /// `tollgate user create --email EMAIL --role ROLE` with a valid password.
    fn create_user(&self, email: &str, role: &str) -> Output {
        self.run_with(
            &["user", "create", "--email", email, "--role", role],
            Some("a long enough password"),
        )
    }

    /// The command `run_with` runs, to start it some other way.
    fn command(&self, args: &[&str], password: Option<&str>) -> Command {
        let mut command = tollgate_on(&self.url(), args);
        command.current_dir(self.dir.path());
        if let Some(password) = password {
            command.env("TOLLGATE_PASSWORD", password);
        }
        command
    }

    /// `tollgate user create --email EMAIL --role ROLE`, which must succeed.
    fn must_create_user(&self, email: &str, role: &str) -> Output {
        let created = self.create_user(email, role);
        assert!(
            created.status.success(),
            "{}",
            String::from_utf8_lossy(&created.stderr)
        );
        created
    }

    /// Stdout of a command that must succeed.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run_with(args, None);
        assert!(
            output.status.success(),
            "`tollgate {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// `tollgate --config CONFIG serve` on a free loopback port, its output
    /// discarded: the process and its base URL, once `/healthz` answers.
    async fn serve(&self, config: &str) -> (Server, String) {
        self.serve_logging_to(config, std::process::Stdio::null())
            .await
    }

    /// [`Cli::serve`] with its log (stderr) sent to `log`.
    async fn serve_logging_to(&self, config: &str, log: std::process::Stdio) -> (Server, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let listen = format!("127.0.0.1:{port}");
        let mut server = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--config", config, "serve", "--listen", &listen])
            .args(["--database-url", &self.url()])
            .current_dir(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let base = format!("http://{listen}");
        let client = reqwest::Client::new();
        let mut up = false;
        for _ in 0..100 {
            if client.get(format!("{base}/healthz")).send().await.is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        if !up {
            server.kill().unwrap();
            server.wait().unwrap();
            panic!("the server did not come up on {listen}");
        }
        (Server(server), base)
    }

    /// A config file in the folder (`extra` lines first) with one model,
    /// `slow-model`, on `mock`, and a member with an API key: the file's path and
    /// the key.
    fn slow_upstream(&self, mock: &upstream::MockUpstream, extra: &str) -> (String, String) {
        self.upstream_at(&mock.base_url, extra)
    }

    /// [`Cli::slow_upstream`] with the upstream at `base_url`.
    fn upstream_at(&self, base_url: &str, extra: &str) -> (String, String) {
        let config = self.dir.path().join("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                r#"{extra}
[[upstreams]]
name = "slow"
base_url = "{}"
[[models]]
id = "slow-model"
upstream = "slow"
input_eur_per_mtok = "1"
output_eur_per_mtok = "2"
max_output_tokens = 100
"#,
                base_url
            ),
        )
        .unwrap();
        let config = config.to_str().unwrap().to_owned();
        let created = self.run_with(
            &[
                "--config",
                &config,
                "user",
                "create",
                "--email",
                "ada@example.com",
                "--role",
                "member",
            ],
            Some("a long enough password"),
        );
        assert!(created.status.success(), "{created:?}");
        let printed = self.ok(&[
            "--config",
            &config,
            "key",
            "create",
            "--email",
            "ada@example.com",
        ]);
        let key = printed
            .split_whitespace()
            .find(|word| word.starts_with("tg_"))
            .unwrap()
            .to_owned();
        (config, key)
    }

    /// A config file in the folder, `house.toml`: workspace House in
    /// Europe/Berlin, a plan of €42 + €8 from 31 January 2026, and two models on
    /// an upstream nothing answers at: House model (`house-model`, €1 / €2 per
    /// million input / output tokens) and Cheap model (`cheap-model`, €0.50 /
    /// €1). Its path.
    fn house_config(&self) -> String {
        let config = self.dir.path().join("house.toml");
        std::fs::write(
            &config,
            r#"
[workspace]
name = "House"
timezone = "Europe/Berlin"
[plan]
budget_eur = "42.00"
overage_eur = "8"
start = "2026-01-31"
[[upstreams]]
name = "house"
base_url = "http://127.0.0.1:9/v1"
[[models]]
id = "house-model"
display_name = "House model"
upstream = "house"
input_eur_per_mtok = "1"
output_eur_per_mtok = "2"
max_output_tokens = 10000
[[models]]
id = "cheap-model"
display_name = "Cheap model"
upstream = "house"
input_eur_per_mtok = "0.5"
output_eur_per_mtok = "1"
max_output_tokens = 1000
"#,
        )
        .unwrap();
        config.to_str().unwrap().to_owned()
    }

    /// Stderr of a command that must fail.
    /// Asserts that `args` followed by 0, then by -1, is refused as a value of
    /// `argument` (as clap names it) below its range from 1.
    fn refuses_below_one(&self, args: &[&str], argument: &str) {
        for bad in ["0", "-1"] {
            let error = self.fails(&[args, &[bad]].concat());
            assert!(
                error.contains(&format!("invalid value '{bad}' for '{argument}'"))
                    && error.contains("is not in 1.."),
                "{error}"
            );
        }
    }

    fn fails(&self, args: &[&str]) -> String {
        let output = self.run_with(args, None);
        assert!(
            !output.status.success(),
            "`tollgate {}` should have failed; it printed {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout)
        );
        String::from_utf8(output.stderr).unwrap()
    }
}

/// A hold of `prompt_tokens` and `output_cap` output tokens of `model`, taken
/// directly in the store by the replica `replica-a` at `now`, its lease
/// ending at `lease_until`: the outcome.
async fn reserve_in(
    store: &app::store::SharedStore,
    catalog: &std::sync::Arc<app::domain::Catalog>,
    (model, prompt_tokens, output_cap): (&str, u64, u64),
    lease_until: chrono::DateTime<chrono::Utc>,
    now: chrono::DateTime<chrono::Utc>,
) -> app::store::ReserveOutcome {
    store
        .reserve(app::store::ReserveRequest {
            catalog: catalog.clone(),
            model: catalog.resolve(model).unwrap().id.clone(),
            estimate: app::domain::TokenEstimate {
                prompt_tokens,
                output_cap: Some(output_cap),
                n: 1,
            },
            spender: app::store::Spender::default(),
            owner: "replica-a".into(),
            lease_until,
            now,
        })
        .await
        .unwrap()
}

/// The settlement of `reservation` with `usage` (none: billed its estimate) at `now`.
fn settlement_of(
    reservation: app::store::ReservationId,
    usage: Option<app::domain::Usage>,
    now: chrono::DateTime<chrono::Utc>,
) -> app::store::Settlement {
    app::store::Settlement {
        reservation,
        usage,
        idempotency_key: None,
        within_reservation: false,
        bill_if_lapsed: false,
        now,
    }
}

/// `reservation list` shows the holds of requests in flight, with the EUR held
/// exactly, and marks those whose lease has ended.
#[tokio::test]
async fn holds_in_flight_are_listed() {
    let cli = Cli::new();
    let empty = cli.ok(&["reservation", "list"]);
    assert_eq!(
        empty,
        "id\trequested\tserved\treserved EUR\tuser\tkey\towner\tcreated\tlease until\tstatus\n"
    );
    let config = server::config::Config::load(None, &server::config::Overrides::default()).unwrap();
    let catalog = config.setup.catalog.clone();
    let store = cli.store().await;
    let now = chrono::Utc::now();
    for (lease_until, max_tokens) in [
        (now + chrono::Duration::minutes(5), 1_000),
        (now - chrono::Duration::seconds(1), 3),
    ] {
        let outcome =
            reserve_in(&store, &catalog, ("gpt-5", 0, max_tokens), lease_until, now).await;
        assert!(matches!(outcome, app::store::ReserveOutcome::Admitted(_)));
    }
    let listed = cli.ok(&["reservation", "list"]);
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows.len(), 2, "{listed}");
    let gpt5 = catalog.resolve("gpt-5").unwrap();
    for (row, (tokens, status)) in rows.iter().zip([(1_000, "held"), (3, "expired")]) {
        let eur = gpt5.prices.output.eur_per_mtok() * rust_decimal::Decimal::from(tokens)
            / rust_decimal::Decimal::from(1_000_000);
        assert_eq!(
            (row[1], row[2], row[3], row[4], row[6], row[9]),
            (
                "gpt-5",
                "gpt-5",
                eur.normalize().to_string().as_str(),
                "-",
                "replica-a",
                status
            ),
            "{listed}"
        );
    }
}

/// `user password` gives a user a new password (TOLLGATE_PASSWORD or standard
/// input, checked as at creation); `demo` gives the demo accounts the password it
/// is given when theirs differs, and leaves a disabled one disabled instead of
/// failing.
#[tokio::test]
async fn passwords_can_be_set_again() {
    let cli = Cli::new();
    let password_of = |email: &'static str| {
        let cli = &cli;
        async move {
            let user = cli.store().await.user_by_email(email).await.unwrap();
            user.map(|u| u.password_hash)
        }
    };
    let demo = cli.run_with(&["demo"], Some("the first demo password"));
    let stderr = String::from_utf8_lossy(&demo.stderr);
    assert!(demo.status.success(), "{stderr}");
    // On a new database it says so, as every command does.
    assert!(
        stderr.contains(&format!("{} held no workspace", cli.url())),
        "{stderr}"
    );
    let hash = password_of("admin@example.com").await.unwrap();
    assert!(app::auth::verify_password("the first demo password", &hash));

    let said = String::from_utf8(
        cli.run_with(&["demo"], Some("the second demo password"))
            .stdout,
    )
    .unwrap();
    assert!(
        said.contains("set the password of admin@example.com to TOLLGATE_PASSWORD"),
        "{said}"
    );
    let hash = password_of("member@example.com").await.unwrap();
    assert!(app::auth::verify_password(
        "the second demo password",
        &hash
    ));
    let said = String::from_utf8(
        cli.run_with(&["demo"], Some("the second demo password"))
            .stdout,
    )
    .unwrap();
    assert!(!said.contains("set the password"), "unchanged: {said}");

    cli.ok(&["user", "disable", "--email", "member@example.com"]);
    let demo = cli.run_with(&["demo"], Some("the second demo password"));
    let said = String::from_utf8_lossy(&demo.stdout);
    assert!(
        demo.status.success() && said.contains("member@example.com is disabled"),
        "{said} {}",
        String::from_utf8_lossy(&demo.stderr)
    );

    let set = cli.run_with(
        &["user", "password", "--email", "ADMIN@example.com"],
        Some("an operator's new password"),
    );
    let said = String::from_utf8_lossy(&set.stdout);
    assert!(
        set.status.success()
            && said.starts_with("set a new password for admin admin@example.com (id "),
        "{said} {}",
        String::from_utf8_lossy(&set.stderr)
    );
    let hash = password_of("admin@example.com").await.unwrap();
    assert!(app::auth::verify_password(
        "an operator's new password",
        &hash
    ));
    for (email, password, says) in [
        ("admin@example.com", "short", "at least 12 characters"),
        ("admin@example.com", "   ", "must not be only spaces"),
        (
            "nobody@example.com",
            "a long enough password",
            "no user has the email \"nobody@example.com\"",
        ),
        // The user is looked for before the password is read or checked.
        (
            "nobody@example.com",
            "short",
            "no user has the email \"nobody@example.com\"",
        ),
    ] {
        let refused = cli.run_with(&["user", "password", "--email", email], Some(password));
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(says),
            "{password:?}: {stderr}"
        );
    }
    let hash = password_of("admin@example.com").await.unwrap();
    assert!(
        app::auth::verify_password("an operator's new password", &hash),
        "a refused password changes nothing"
    );
    assert!(cli.ok(&["audit"]).contains("user.password"));
}

/// `usage list` prints the ledger newest first, tab separated, each row's
/// counts, exact cost and flags; `--flagged` keeps the flagged ones, and
/// `--limit` the last ones.
#[tokio::test]
async fn the_ledger_is_listed() {
    let cli = Cli::new();
    let header = "id\tat\tuser\tkey\trequested\tserved\tprompt\tcached\tcompletion\treasoning\tcost EUR\tflags\tidempotency key\tcycle start\n";
    assert_eq!(cli.ok(&["usage", "list"]), header);
    let config = server::config::Config::load(None, &server::config::Overrides::default()).unwrap();
    let catalog = config.setup.catalog.clone();
    let store = cli.store().await;
    let now = chrono::Utc::now();
    let mut held = Vec::new();
    for _ in 0..2 {
        let lease_until = now + chrono::Duration::minutes(5);
        match reserve_in(&store, &catalog, ("gpt-5", 0, 1_000), lease_until, now).await {
            app::store::ReserveOutcome::Admitted(reservation) => held.push(reservation),
            app::store::ReserveOutcome::Blocked(blocked) => panic!("{}", blocked.message),
        }
    }
    for (reservation, usage) in held.iter().zip([
        Some(app::domain::Usage {
            prompt_tokens: 20,
            cached_tokens: 4,
            completion_tokens: 10,
            reasoning_tokens: 2,
        }),
        None,
    ]) {
        // Under the key the gateway settles with, which is no caller's.
        let mut settlement = settlement_of(reservation.id.clone(), usage, now);
        settlement.idempotency_key = Some(server::gateway::hold::settlement_key(&reservation.id));
        store.settle(settlement).await.unwrap();
    }
    let rows = |listed: &str| -> Vec<Vec<String>> {
        listed
            .lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect()
    };
    let listed = cli.ok(&["usage", "list"]);
    assert!(listed.starts_with(header), "{listed}");
    let all = rows(&listed);
    assert_eq!(all.len(), 2, "{listed}");
    // Newest first: the estimate, billed what was held.
    let held_eur = held[1].amount.to_money().amount().normalize().to_string();
    assert_eq!(
        all[0][4..13],
        [
            "gpt-5",
            "gpt-5",
            "-",
            "-",
            "-",
            "-",
            held_eur.as_str(),
            "estimated",
            "-"
        ],
        "{listed}"
    );
    assert_eq!(
        &all[1][4..10],
        ["gpt-5", "gpt-5", "20", "4", "10", "2"],
        "{listed}"
    );
    assert_eq!(
        (all[1][11].as_str(), all[1][12].as_str()),
        ("-", "-"),
        "{listed}"
    );
    // Each row names the cycle it was billed in, by its first instant.
    let cycle = store.spend_snapshot(now).await.unwrap().cycle;
    let cycle_start = app::text::shown_time(cycle.start);
    assert!(
        all.iter().all(|row| row[13] == cycle_start),
        "{cycle_start}: {listed}"
    );
    assert_eq!(
        cli.ok(&["usage", "list", "--flagged"]),
        format!("{header}{}\n", all[0].join("\t"))
    );
    assert_eq!(
        cli.ok(&["usage", "list", "--limit", "1"]),
        format!("{header}{}\n", all[0].join("\t"))
    );
    let refused = cli.run_with(&["usage", "list", "--limit", "0"], None);
    assert!(!refused.status.success());
    // A usage-API record shows the key its caller sent; a key of `-` is not
    // shown as no key.
    for (key, shown) in [("it's\u{2028}run-3", "it's\\u{2028}run-3"), ("-", "\\-")] {
        let record = app::store::UsageRecord {
            idempotency_key: server::gateway::usage_api::ledger_key(7, key),
            model: catalog.resolve("gpt-5").unwrap(),
            model_as_sent: "gpt-5",
            usage: app::domain::Usage {
                prompt_tokens: 1,
                cached_tokens: 0,
                completion_tokens: 1,
                reasoning_tokens: 0,
            },
        };
        store
            .record_usage(&[record], app::store::Spender::default(), now)
            .await
            .unwrap();
        let listed = cli.ok(&["usage", "list", "--limit", "1"]);
        assert_eq!(rows(&listed)[0][12], shown, "{listed}");
    }
}

#[test]
fn users_and_keys() {
    let cli = Cli::new();
    let created = cli.must_create_user("ada@example.com", "admin");
    // The first command on a database says it was new; the next ones do not.
    let new_database = format!("{} held no workspace", cli.url());
    let stderr = String::from_utf8_lossy(&created.stderr);
    assert!(stderr.contains(&new_database), "{stderr}");
    let listed = cli.run_with(&["user", "list"], None);
    let stderr = String::from_utf8_lossy(&listed.stderr);
    assert!(
        listed.status.success() && !stderr.contains(&new_database),
        "{stderr}"
    );
    for (password, says) in [
        ("", "no password given"),
        ("            ", "must not be only spaces"),
        ("short", "at least 12 characters"),
    ] {
        let refused = cli.run_with(
            &[
                "user",
                "create",
                "--email",
                "bob@example.com",
                "--role",
                "member",
            ],
            Some(password),
        );
        assert!(
            !refused.status.success(),
            "password {password:?} was accepted"
        );
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(stderr.contains(says), "{password:?}: {stderr}");
    }
    let long = format!("{}@example.com", "a".repeat(250));
    // 254 bytes as typed, 255 in lower case, as it would be stored.
    let longer_in_lower_case = format!("\u{130}{}@example.com", "a".repeat(240));
    assert_eq!(longer_in_lower_case.len(), 254);
    for (email, bytes) in [(&long, 262), (&longer_in_lower_case, 255)] {
        let refused = cli.create_user(email, "member");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success()
                && stderr.contains(&format!("is {bytes} bytes long"))
                && stderr.contains("; an email address has at most 254 (RFC 5321)"),
            "{email:?}: {stderr}"
        );
    }
    // The part before the @ is measured as stored, and the message says so:
    // 22 `İ` are 44 bytes as typed, 66 in lower case.
    let dotted_capitals = format!("{}@k1.fr", "\u{130}".repeat(22));
    let refused = cli.create_user(&dotted_capitals, "member");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains(
                "the part before the @ is 66 bytes long in lower case, as it is stored; it has at most 64"
            ),
        "{stderr}"
    );
    // Characters that do not show as themselves, each making a user who
    // prints like another: controls, a zero-width space, characters drawn as
    // nothing (Default_Ignorable_Code_Point) or as a blank.
    let hidden = [
        "evil\u{1b}[2J@example.com",
        "tab\t@example.com",
        "zero\u{200b}width@example.com",
        "a\u{34f}da@example.com",
        "ada\u{fe0f}@example.com",
        "ada\u{e0100}@example.com",
        "ada\u{180b}@example.com",
        "ada\u{17b4}@example.com",
        "ada\u{3164}@example.com",
        "ada\u{115f}@example.com",
        "ada\u{2800}@example.com",
        "a\u{e000}b@example.com",
        "a\u{f0000}b@example.com",
        "a\u{ffff}b@example.com",
        "a\u{378}b@example.com",
    ];
    // Addresses no mail system delivers to, each told what is wrong.
    let long_label = format!("a@{}.com", "b".repeat(64));
    // 58 `é` are 64 bytes in `xn--` form.
    let long_unicode_label = format!("g@{}.fr", "\u{e9}".repeat(58));
    let refusals: Vec<(&str, &str)> = [
        ("a@@example.com", "it has more than one @"),
        ("a@b@example.com", "it has more than one @"),
        (
            "<a@example.com>",
            "give the address alone, without a name or angle brackets",
        ),
        ("Ada <ada@example.com>", "give the address alone"),
        ("a b@example.com", "it holds a space"),
        (
            "ada\u{a0}@example.com",
            "it holds a character that does not show as itself",
        ),
        ("ada.example.com", "it has no @"),
        ("\"a..b\"@example.com", "the part before the @ is in quotes"),
        ("\"ada\"@example.com", "the part before the @ is in quotes"),
        (
            ".a@example.com",
            "the part before the @ starts or ends with a dot, or has two in a row",
        ),
        ("a.@example.com", "starts or ends with a dot"),
        ("a..b@example.com", "has two in a row"),
        (
            "a,b@example.com",
            "the part before the @ holds ',', which an address has only in quotes",
        ),
        (
            "a@-example.com",
            "a label of its domain starts or ends with a hyphen",
        ),
        (
            "a@example-.com",
            "a label of its domain starts or ends with a hyphen",
        ),
        (
            "a@example..com",
            "its domain has two dots in a row, or a dot at an end",
        ),
        (
            "a@.example.com",
            "its domain has two dots in a row, or a dot at an end",
        ),
        ("ada@example", "its domain has no dot"),
        (&long_label, "is 64 bytes long as DNS writes it"),
        (
            &long_unicode_label,
            "is 64 bytes long as DNS writes it (in IDNA's ASCII form, xn--…); it has at most 63 (RFC 1035)",
        ),
        ("a@[192.168.0.1]", "its domain is an address in brackets"),
        ("ada@127.0.0.1", "its last label is a number"),
        ("ada@123.456", "its last label is a number"),
        (
            "ada@xn--zz.com",
            "starts with xn-- but is no name encoded by IDNA",
        ),
        ("ada@ab--cd.com", "hyphens in its third and fourth places"),
        (
            "ada@ex_ample.com",
            "its domain holds a character no domain name has",
        ),
        (
            "ada@ex%c3%a4mple.com",
            "its domain holds a character no domain name has",
        ),
    ]
    .into_iter()
    .chain(hidden.map(|email| (email, "it holds a character that does not show as itself")))
    .collect();
    for (email, says) in refusals {
        let refused = cli.create_user(email, "member");
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success()
                && stderr.contains("is not an email address: ")
                && stderr.contains(says),
            "{email:?}: {stderr}"
        );
    }
    // Refused before a password is asked for (here none is given).
    let refused = cli.run_with(
        &[
            "user",
            "create",
            "--email",
            "not-an-email",
            "--role",
            "member",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("is not an email address"),
        "{stderr}"
    );
    let again = cli.create_user("ADA@example.com", "member");
    assert!(
        !again.status.success(),
        "an email is unique regardless of case"
    );
    // Non-ASCII letters too, and the CLI finds the user by any spelling.
    let emile = cli.create_user("Émile@example.com", "member");
    assert!(
        emile.status.success(),
        "{}",
        String::from_utf8_lossy(&emile.stderr)
    );
    let stderr = String::from_utf8_lossy(&cli.create_user("émile@example.com", "member").stderr)
        .into_owned();
    assert!(stderr.contains("exists already"), "{stderr}");
    let key = cli.ok(&["key", "create", "--email", "ÉMILE@example.com"]);
    assert!(key.starts_with("tg_"), "{key}");
    let listed = cli.ok(&["key", "list", "--email", "émile@EXAMPLE.com"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    assert!(listed.contains("\témile@example.com\t"), "{listed}");
    // A label's 63 bytes are counted in IDNA's ASCII form, as DNS counts
    // them: 22 CJK characters are 66 bytes of UTF-8 but 27 of `xn--`.
    let cjk = cli.create_user(&format!("x@{}.com", "\u{4f8b}".repeat(22)), "member");
    assert!(
        cjk.status.success(),
        "{}",
        String::from_utf8_lossy(&cjk.stderr)
    );
    // A domain in its ASCII form (IDNA) is the same domain.
    let ida = cli.create_user("ida@EXÄMPLE.com", "member");
    assert!(
        ida.status.success(),
        "{}",
        String::from_utf8_lossy(&ida.stderr)
    );
    let stderr =
        String::from_utf8_lossy(&cli.create_user("ida@xn--exmple-cua.com", "member").stderr)
            .into_owned();
    assert!(stderr.contains("exists already"), "{stderr}");
    let listed = cli.ok(&["key", "list", "--email", "IDA@xn--exmple-cua.com"]);
    assert_eq!(listed.lines().count(), 1, "only the header: {listed}");
    assert!(cli.ok(&["user", "list"]).contains("ida@exämple.com\t"));

    // The key alone on stdout, once.
    let key = cli.ok(&[
        "key",
        "create",
        "--email",
        "ada@example.com",
        "--name",
        "laptop",
    ]);
    let key = key.trim_end_matches('\n');
    assert!(
        key.starts_with("tg_") && !key.contains(char::is_whitespace),
        "{key:?}"
    );
    let long_name = "n".repeat(101);
    for (name, says) in [
        ("  ", "--name must not be empty"),
        ("a\tb", "control character"),
        (long_name.as_str(), "at most 100 characters"),
        ("a\nfake\trow", "control character"),
        ("gpj\u{202e}.exe", "direction override"),
        ("a\u{2028}b", "line break"),
        ("a\u{2029}b", "line break"),
        ("a\u{a0}b", "no-break space"),
        // Only plain spaces are trimmed: one at an end is refused too.
        ("\u{a0}x", "no-break space"),
        ("x\u{2003}", "no-break space"),
        ("a\u{3000}b", "no-break space"),
        ("a\u{e000}b", "private-use"),
        ("a\u{378}b", "private-use"),
    ] {
        let stderr = cli.fails(&[
            "key",
            "create",
            "--email",
            "ada@example.com",
            "--name",
            name,
        ]);
        assert!(stderr.contains(says), "{name:?}: {stderr}");
    }
    let stderr = cli.fails(&["key", "create", "--email", "nobody@example.com"]);
    assert!(
        stderr.contains("no user has the email \"nobody@example.com\""),
        "{stderr}"
    );

    let list = cli.ok(&["key", "list"]);
    assert!(!list.contains(key), "the key itself is never listed");
    let row = list.lines().find(|line| line.contains("laptop")).unwrap();
    let id = row.split('\t').next().unwrap().to_owned();
    assert!(
        row.contains("ada@example.com") && row.ends_with("active"),
        "{row}"
    );
    // Times as the usage API writes them: UTC, to the millisecond, with `Z`.
    let created = row.split('\t').nth(3).unwrap();
    assert!(
        created.len() == "2026-12-07T14:05:09.120Z".len()
            && created.ends_with('Z')
            && chrono::DateTime::parse_from_rfc3339(created).is_ok(),
        "{row}"
    );
    assert!(cli
        .ok(&["key", "list", "--email", "ada@example.com"])
        .contains("laptop"));
    let stderr = cli.fails(&["key", "list", "--email", "nobody@example.com"]);
    assert!(
        stderr.contains("no user has the email \"nobody@example.com\""),
        "{stderr}"
    );

    assert_eq!(
        cli.ok(&["key", "revoke", &id]),
        format!("revoked key {id}\n")
    );
    // Again: said, not an error, so a script may run twice.
    assert!(cli
        .ok(&["key", "revoke", &id])
        .starts_with(&format!("key {id} was already revoked on ")));
    assert!(cli
        .ok(&["key", "list"])
        .lines()
        .any(|l| l.contains("laptop") && l.ends_with("revoked")));
    let stderr = cli.fails(&["key", "revoke", "999"]);
    assert!(stderr.contains("no API key has the id 999"), "{stderr}");
    // An id that cannot be one names the argument and the range.
    cli.refuses_below_one(&["key", "revoke"], "<KEY_ID>");

    // A user who leaves: disabled with their live keys, listed as such, kept.
    let phone = cli
        .ok(&[
            "key",
            "create",
            "--email",
            "ada@example.com",
            "--name",
            "phone",
        ])
        .trim()
        .to_owned();
    let users = cli.ok(&["user", "list"]);
    assert!(
        users.starts_with("id\temail\trole\tcreated\tstatus\tlive keys\n"),
        "{users}"
    );
    let ada = users
        .lines()
        .find(|l| l.contains("ada@example.com"))
        .unwrap();
    assert!(
        ada.contains("\tadmin\t") && ada.ends_with("\tenabled\t1"),
        "{ada}"
    );
    let disabled = cli.run_with(&["user", "disable", "--email", "ADA@example.com"], None);
    assert!(disabled.status.success());
    let said = String::from_utf8_lossy(&disabled.stdout);
    assert!(
        said.starts_with("disabled admin ada@example.com (id ")
            && said.ends_with("revoked 1 key(s)\n"),
        "{said}"
    );
    // The last enabled administrator: allowed, and said.
    let warned = String::from_utf8_lossy(&disabled.stderr);
    assert!(
        warned.contains("warning: no enabled administrator is left"),
        "{warned}"
    );
    let ada = cli.ok(&["user", "list"]);
    let ada = ada.lines().find(|l| l.contains("ada@example.com")).unwrap();
    assert!(
        ada.contains("\tdisabled 20") && ada.ends_with("\t0"),
        "{ada}"
    );
    assert!(cli
        .ok(&["user", "disable", "--email", "Ada@Example.com"])
        .starts_with("ada@example.com was already disabled on "));
    let stderr = cli.fails(&["user", "disable", "--email", "nobody@example.com"]);
    assert!(
        stderr.contains("no user has the email \"nobody@example.com\""),
        "{stderr}"
    );
    let stderr = cli.fails(&["key", "create", "--email", "ada@example.com"]);
    assert!(
        stderr.contains("was disabled on") && stderr.contains("no new key"),
        "{stderr}"
    );
    // Their keys stay listed, revoked.
    assert!(cli
        .ok(&["key", "list", "--email", "ada@example.com"])
        .lines()
        .all(|l| l.starts_with("id\t") || l.ends_with("revoked")));
    // Back again: enabled, a new key; the old ones stay revoked.
    let said = cli.ok(&["user", "enable", "--email", "Ada@example.com"]);
    assert!(
        said.starts_with("enabled admin ada@example.com (id ")
            && said.contains("old keys stay revoked"),
        "{said}"
    );
    // Said with the email as stored, however it was typed.
    assert_eq!(
        cli.ok(&["user", "enable", "--email", "ADA@example.com"]),
        "ada@example.com is already enabled\n"
    );
    let stderr = cli.fails(&["user", "enable", "--email", "nobody@example.com"]);
    assert!(
        stderr.contains("no user has the email \"nobody@example.com\""),
        "{stderr}"
    );
    let created = cli.run_with(
        &[
            "key",
            "create",
            "--email",
            "Ada@example.com",
            "--name",
            "laptop",
        ],
        None,
    );
    let laptop = String::from_utf8(created.stdout).unwrap();
    assert!(
        laptop.starts_with("tg_") && laptop.lines().count() == 1,
        "the key alone on stdout: {laptop}"
    );
    // The id that lists and revokes it, on stderr.
    let listed = cli.ok(&["key", "list", "--email", "ada@example.com"]);
    let id = listed
        .lines()
        .find(|l| l.contains("\tlaptop\t") && l.ends_with("\tactive"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_owned();
    assert_eq!(
        String::from_utf8(created.stderr).unwrap(),
        format!("created key {id} (laptop) for ada@example.com: it is shown this once\n")
    );
    let ada = cli.ok(&["user", "list"]);
    let ada = ada.lines().find(|l| l.contains("ada@example.com")).unwrap();
    assert!(ada.ends_with("\tenabled\t1"), "{ada}");
    let audit = cli.ok(&["audit"]);
    assert!(
        audit.contains("user.disable") && audit.contains("user.enable"),
        "{audit}"
    );
    assert!(!audit.contains(&phone), "keys never reach the audit log");
}

/// Commands started at once on a new database file migrate it one after the
/// other and all succeed (they raced to create the same tables).
#[test]
fn commands_started_at_once_on_a_new_file_all_succeed() {
    let cli = Cli::new();
    let children: Vec<_> = (0..12)
        .map(|i| {
            let state = if i % 2 == 0 { "on" } else { "off" };
            cli.command(&["fallback", state], None)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// A listing piped into a reader that stops early (`tollgate user list | head -1`)
/// ends quietly, with the shell's status for a closed pipe, not a panic.
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let cli = Cli::new();
    // `args` run with a stdout whose reader is gone before it writes a byte.
    let into_closed_pipe = |args: &[&str]| {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        cli.command(args, None)
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap()
    };
    for args in [["user", "list"], ["key", "list"], ["config", "example"]] {
        let output = into_closed_pipe(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(141), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }

    // A key is shown once: one that nobody could read is revoked, not left live.
    let made = cli.create_user("ada@example.com", "member");
    assert!(made.status.success(), "{made:?}");
    let output = into_closed_pipe(&["key", "create", "--email", "ada@example.com"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(141), "{stderr}");
    assert!(
        stderr.contains("could not be shown") && stderr.contains("was revoked"),
        "{stderr}"
    );
    let keys = cli.ok(&["key", "list", "--email", "ada@example.com"]);
    let rows: Vec<&str> = keys.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{keys}");
    assert!(rows[0].ends_with("\trevoked"), "{keys}");
}

#[test]
fn limit_set_notes_a_limit_that_stops_everything_or_nothing() {
    let cli = Cli::new();
    let stderr_of = |args: &[&str]| {
        let output = cli.run_with(args, None);
        assert!(output.status.success(), "{args:?}");
        String::from_utf8(output.stderr).unwrap()
    };
    // (The first command also says it set up the new database.)
    assert!(stderr_of(&["limit", "set", "gpt-5", "--eur", "0"])
        .contains("\nnote: At €0.00 this limit lets no request through"));
    assert!(stderr_of(&["limit", "set", "gpt-5", "--eur", "1000000"])
        .starts_with("note: This is more than the workspace may spend in a cycle (€"),);
    // Nothing to say of an ordinary limit, or of one that is off.
    assert_eq!(stderr_of(&["limit", "set", "gpt-5", "--eur", "12"]), "");
    assert_eq!(
        stderr_of(&["limit", "set", "gpt-5", "--eur", "0", "--disabled"]),
        ""
    );
}

#[test]
fn limits_fallback_and_their_audit() {
    let cli = Cli::new();
    cli.ok(&["limit", "set", "gpt-5", "--eur", "12.50"]);
    let stderr = cli.fails(&["limit", "set", "gpt-5", "--eur", "-1"]);
    assert!(
        stderr.contains("--eur \"-1\""),
        "the tab's message, not clap's: {stderr}"
    );
    let stderr = cli.fails(&["limit", "set", "no-such-model", "--eur", "1"]);
    assert!(stderr.contains("no-such-model"), "{stderr}");
    // --disabled alone turns the limit off and keeps its amount, as the tab's
    // toggle does; neither option is asked for by name.
    assert_eq!(
        cli.ok(&["limit", "set", "gpt-5", "--disabled"]),
        "gpt-5: limit €12.50 per cycle, disabled\n"
    );
    let spend = cli.ok(&["spend"]);
    assert!(
        spend
            .lines()
            .any(|l| l.starts_with("gpt-5\t") && l.ends_with("\t12.5\tdisabled")),
        "{spend}"
    );
    let stderr = cli.fails(&["limit", "set", "gpt-5"]);
    assert!(stderr.contains("--eur <EUR>"), "{stderr}");
    let stderr = cli.fails(&["limit", "set", "no-such-model", "--disabled"]);
    assert!(stderr.contains("no-such-model"), "{stderr}");
    cli.ok(&["limit", "set", "gpt-5", "--eur", "12.50"]);
    cli.ok(&["limit", "clear", "gpt-5"]);
    cli.ok(&["fallback", "off"]);
    cli.ok(&["fallback", "on"]);
    let stderr = cli.fails(&["fallback", "maybe"]);
    assert!(!stderr.is_empty());

    // Newest first: the two fallback changes, then the limit's clear, set,
    // turning off and set.
    let audit = cli.ok(&["audit", "--limit", "10"]);
    let lines: Vec<&str> = audit.lines().filter(|l| l.contains("cli")).collect();
    assert_eq!(lines.len(), 6, "{audit}");
    assert!(
        lines[0].contains("fallback") && lines[1].contains("fallback"),
        "{audit}"
    );
    assert!(lines[2..].iter().all(|l| l.contains("gpt-5")), "{audit}");
    assert!(lines[5].contains("12.5"), "the set limit, in EUR: {audit}");
    assert_eq!(
        cli.ok(&["audit", "--limit", "1"])
            .lines()
            .filter(|l| l.contains("cli"))
            .count(),
        1
    );
    // A count of rows that is not one names the option and the range.
    cli.refuses_below_one(&["audit", "--limit"], "--limit <LIMIT>");
}

#[test]
fn config_example_is_a_config_that_loads() {
    let cli = Cli::new();
    let example = cli.ok(&["config", "example"]);
    let path = cli.dir.path().join("example.toml");
    std::fs::write(&path, &example).unwrap();
    // It names an upstream key variable; the config loads all the same.
    server::config::Config::load(Some(&path), &server::config::Overrides::default()).unwrap();
    let stderr = cli.fails(&["config", "example", "--no-such-flag"]);
    assert!(stderr.contains("--no-such-flag"), "{stderr}");
}

/// The config's plan and catalog are the server's: a command run with another
/// config, or none (the embedded default), leaves them as they are, so it cannot
/// change what a running server bills against. Only a new database takes the
/// command's config.
#[tokio::test]
async fn commands_leave_the_servers_plan_and_catalog_alone() {
    let cli = Cli::new();
    let config = cli.house_config();
    let config = config.as_str();
    // A new database: the first command sets it up from its config.
    cli.ok(&["--config", config, "key", "list"]);
    let plan = || async {
        cli.store()
            .await
            .spend_snapshot(chrono::Utc::now())
            .await
            .unwrap()
            .plan
    };
    let before = plan().await;
    assert_eq!(before.amounts.budget.get(), 42_000_000_000);

    // Without --config: the embedded default (a €500 + €100 plan, UTC) is not applied.
    cli.ok(&["key", "list"]);
    cli.ok(&["audit"]);
    assert_eq!(plan().await, before);
    // Its limits are checked against the catalog in the database.
    cli.ok(&["limit", "set", "house-model", "--eur", "5"]);
    let stderr = cli.fails(&["limit", "set", "gpt-5", "--eur", "5"]);
    assert!(
        stderr.contains("\"gpt-5\" is not a model of the catalog")
            && stderr.contains("by its id, or pass the server's --config"),
        "{stderr}"
    );
    // Nor are aliases read from the embedded default's catalog (where
    // `openai/gpt-5` is `gpt-5`): without a config file, a name is an id.
    let stderr = cli.fails(&["limit", "set", "openai/gpt-5", "--eur", "5"]);
    assert!(
        stderr.contains("\"openai/gpt-5\" is not a model of the catalog"),
        "{stderr}"
    );
    // A long name (one the catalog could hold) is quoted by its start.
    let long = format!("gpt-{}", "x".repeat(150));
    let stderr = cli.fails(&["limit", "clear", &long]);
    let start: String = long.chars().take(64).collect();
    assert!(
        stderr.contains(&format!("\"{start}\"… is not a model of the catalog")),
        "{stderr}"
    );
    assert!(stderr.len() < 400, "{} bytes", stderr.len());
    assert_eq!(plan().await, before);
}

/// `spend` prints the current cycle's books as the tab shows them, in exact
/// EUR, over the catalog the books were set up with, whatever config it is
/// given (here none: the embedded default lists other models); `--json` prints
/// the report of `GET /api/v1/spend`.
#[tokio::test]
async fn spend_prints_the_books_of_the_cycle() {
    let cli = Cli::new();
    let config = cli.house_config();
    let config = config.as_str();
    // A new database, set up from the house config.
    cli.ok(&["--config", config, "key", "list"]);
    let catalog = server::config::Config::load(
        Some(std::path::Path::new(config)),
        &server::config::Overrides::default(),
    )
    .unwrap()
    .setup
    .catalog;
    let store = cli.store().await;
    let now = chrono::Utc::now();
    let reserve = |model: &'static str, prompt_tokens: u64, output_cap: u64| {
        let (store, catalog) = (store.clone(), catalog.clone());
        async move {
            let lease_until = now + chrono::Duration::minutes(5);
            let bounds = (model, prompt_tokens, output_cap);
            match reserve_in(&store, &catalog, bounds, lease_until, now).await {
                app::store::ReserveOutcome::Admitted(reservation) => reservation,
                blocked => panic!("{blocked:?}"),
            }
        }
    };
    // 10,000 input and 5,000 output tokens of House model: €0.01 + €0.01.
    let settled = reserve("house-model", 10_000, 5_000).await;
    store
        .settle(settlement_of(
            settled.id,
            Some(app::domain::Usage {
                prompt_tokens: 10_000,
                cached_tokens: 0,
                completion_tokens: 5_000,
                reasoning_tokens: 0,
            }),
            now,
        ))
        .await
        .unwrap();
    // A hold of up to 100 output tokens of Cheap model: €0.0001.
    reserve("cheap-model", 0, 100).await;
    cli.ok(&["limit", "set", "house-model", "--eur", "0.05"]);
    cli.ok(&["limit", "set", "cheap-model", "--eur", "5", "--disabled"]);
    let cycle = store.spend_snapshot(now).await.unwrap().cycle;
    let day = |date: chrono::NaiveDate| date.format("%-d %b %Y").to_string();

    let printed = cli.ok(&["spend"]);
    assert_eq!(
        printed,
        format!(
            "billing period\t{} – {}\n\
             resets on\t{}\n\
             status\tWithin plan budget\n\
             spent EUR\t0.02\n\
             reserved EUR\t0.0001\n\
             plan budget EUR\t42\n\
             overage limit EUR\t8\n\
             allowance EUR\t50\n\
             used\t0.0%\n\
             automatic fallback\ton\n\
             \n\
             model\tname\tspent EUR\tshare %\tlimit EUR\tlimit\n\
             house-model\tHouse model\t0.02\t100.0\t0.05\tenabled\n\
             cheap-model\tCheap model\t0\t0.0\t5\tdisabled\n",
            day(cycle.first_day),
            day(cycle.last_day),
            day(cycle.last_day.succ_opt().unwrap()),
        )
    );

    // A limit used up is said; one cleared is none.
    cli.ok(&["limit", "set", "house-model", "--eur", "0.02"]);
    cli.ok(&["limit", "clear", "cheap-model"]);
    let printed = cli.ok(&["spend"]);
    let models: Vec<&str> = printed.lines().skip(12).collect();
    assert_eq!(
        models,
        [
            "house-model\tHouse model\t0.02\t100.0\t0.02\tenabled, reached",
            "cheap-model\tCheap model\t0\t0.0\t\tnone",
        ],
        "{printed}"
    );

    let json: serde_json::Value = serde_json::from_str(&cli.ok(&["spend", "--json"])).unwrap();
    assert_eq!(json["spent_eur"], "0.02");
    assert_eq!(json["reserved_eur"], "0.0001");
    assert_eq!(json["plan_budget_eur"], "42");
    assert_eq!(json["status"], "within_plan_budget");
    assert_eq!(json["cycle"]["first_day"], cycle.first_day.to_string());
    let models: Vec<(&str, &str, &str, bool)> = json["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap(),
                m["spent_eur"].as_str().unwrap(),
                m["share_percent"].as_str().unwrap(),
                m["in_catalog"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        models,
        [
            ("house-model", "0.02", "100.0", true),
            ("cheap-model", "0", "0.0", true)
        ]
    );

    // A server started on a catalog without House model: its spend stays in the
    // cycle, listed by id, with no limit to set.
    let mut setup = server::config::Config::load(
        Some(std::path::Path::new(config)),
        &server::config::Overrides::default(),
    )
    .unwrap()
    .setup;
    let cheap = catalog.resolve("cheap-model").unwrap().clone();
    setup.catalog = std::sync::Arc::new(app::domain::Catalog::new(vec![cheap]).unwrap());
    store.apply_setup(&setup, now).await.unwrap();
    let printed = cli.ok(&["--config", config, "spend"]);
    let models: Vec<&str> = printed.lines().skip(12).collect();
    assert_eq!(
        models,
        [
            "house-model\thouse-model\t0.02\t100.0\t0.02\tnot in the catalog",
            "cheap-model\tCheap model\t0\t0.0\t\tnone",
        ],
        "{printed}"
    );
    // Its limit cannot be set, and the command says why, not to use its id.
    for args in [
        &[
            "--config",
            config,
            "limit",
            "set",
            "house-model",
            "--eur",
            "1",
        ][..],
        &["limit", "set", "house-model", "--disabled"][..],
    ] {
        let stderr = cli.fails(args);
        assert!(
            stderr.contains("the server's catalog no longer lists it")
                && !stderr.contains("by its id"),
            "{args:?}: {stderr}"
        );
    }
}

/// A PostgreSQL URL that asks for TLS is refused at once, naming the mode and
/// what to use instead (this build speaks no TLS), with the password masked.
#[test]
fn a_database_url_asking_for_tls_is_refused_plainly() {
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!("postgres://app:secret@127.0.0.1:9/tollgate?sslmode={mode}");
        let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["--database-url", &url, "key", "list"])
            .env_remove("TOLLGATE_CONFIG")
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8(output.stderr).unwrap();
        assert!(
            stderr.contains(&format!(
                "asks for TLS (sslmode={mode}, from the URL or PGSSLMODE)"
            )) && stderr.contains("sslmode=disable or prefer")
                && stderr.contains("`TOLLGATE_DATABASE_URL / --database-url` (postgres://app:***@")
                && !stderr.contains("secret"),
            "{stderr}"
        );
    }
}

/// A `TOLLGATE_LOG` that is not a tracing filter is said, not silently ignored.
#[test]
fn a_bad_log_filter_is_reported() {
    let cli = Cli::new();
    let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["key", "list", "--database-url", &cli.url()])
        .current_dir(cli.dir.path())
        .env("TOLLGATE_LOG", "[[[")
        .output()
        .unwrap();
    assert!(output.status.success(), "the command still runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TOLLGATE_LOG=\"[[[\" is not a tracing filter"),
        "{stderr}"
    );
}

/// Logs written to a file or a pipe are plain text, without terminal colours.
#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let cli = Cli::new();
    let output = cli
        .command(&["key", "list"], None)
        .env("TOLLGATE_LOG", "debug")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.is_empty(), "the command logged nothing to look at");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

/// An empty `TOLLGATE_CONFIG` is refused, not taken for "no config": `serve`
/// would apply the embedded demo plan and catalog to the books.
#[test]
fn an_empty_config_variable_is_refused() {
    let cli = Cli::new();
    for args in [
        &["key", "list"][..],
        &["serve", "--listen", "127.0.0.1:0"][..],
    ] {
        let output = cli
            .command(args, None)
            .env("TOLLGATE_CONFIG", "")
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("is TOLLGATE_CONFIG set to nothing?"),
            "{stderr}"
        );
    }
    // An explicit --config overrides the empty variable, before or after the
    // command; `config example` reads no config.
    let file = cli.dir.path().join("t.toml");
    std::fs::write(&file, "[workspace]\nname = \"T\"\n").unwrap();
    let file = file.to_str().unwrap();
    for args in [
        &["--config", file, "key", "list"][..],
        &["key", "list", "--config", file][..],
        &["config", "example"][..],
    ] {
        let output = cli
            .command(args, None)
            .env("TOLLGATE_CONFIG", "")
            .output()
            .unwrap();
        assert!(output.status.success(), "{args:?}: {output:?}");
    }
}

/// `tollgate serve` stops gracefully on SIGTERM: it waits for the request in
/// flight (here an upstream that answers in a minute). A second SIGTERM ends it at
/// once, with status 130.
#[tokio::test]
async fn a_second_sigterm_stops_the_server_at_once() {
    let cli = Cli::new();
    let mock = upstream::MockUpstream::start().await;
    mock.set(|b| b.delay = std::time::Duration::from_secs(60));
    let (config, key) = cli.slow_upstream(&mock, "");
    let config = config.as_str();
    let (mut server, base) = cli.serve(config).await;
    let client = reqwest::Client::new();
    let in_flight = tokio::spawn(slow_chat(&client, &base, &key).send());
    for _ in 0..100 {
        if !mock.received().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(mock.received().len(), 1, "the request reached the upstream");

    server.terminate();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        server.try_wait().unwrap().is_none(),
        "the first SIGTERM waits for the request in flight"
    );
    server.terminate();
    let status = server
        .exited_within(std::time::Duration::from_secs(5))
        .await
        .expect("the second SIGTERM stops the server");
    assert_eq!(status.code(), Some(130));
    in_flight.abort();
}

/// A connection to the server at `base` with a 4 KiB receive buffer, so that the
/// server soon waits for its reader, on which a chat completion with `body` and
/// the API key `key` has been sent.
async fn post_with_a_small_window(
    base: &str,
    key: &str,
    body: &serde_json::Value,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let address: std::net::SocketAddr = base.trim_start_matches("http://").parse().unwrap();
    let mut stream = socket.connect(address).await.unwrap();
    let body = body.to_string();
    stream
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\
                 Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    stream
}

/// A client that stops reading a stream is disconnected once it has taken none of
/// it for `response_write_timeout_secs`, and its request is settled (no hold is
/// left); a stream that is only quiet upstream for longer than that is not cut.
#[tokio::test]
async fn clients_that_stop_reading_are_disconnected_and_quiet_streams_are_not() {
    use tokio::io::AsyncReadExt;

    let cli = Cli::new();
    let mock = upstream::MockUpstream::start().await;
    let (config, key) = cli.slow_upstream(&mock, "response_write_timeout_secs = 1");
    let (mut server, base) = cli.serve(&config).await;
    let body = serde_json::json!({"model": "slow-model", "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});

    // Quiet for 3 s after its first piece, then on to the end.
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    mock.set(|b| b.pause_after_first_piece = Some(gate.clone()));
    let quiet = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(quiet.status(), reqwest::StatusCode::OK);
    let open = gate.clone();
    let opener = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        open.notify_one();
    });
    let text = quiet.text().await.unwrap();
    opener.await.unwrap();
    assert!(
        text.contains("data: [DONE]"),
        "a quiet stream was cut: {text}"
    );

    // About 20 MB of stream, to a client that reads its first bytes and stops.
    mock.set(|b| {
        b.pause_after_first_piece = None;
        b.stream_pieces = 150_000;
    });
    let mut stalled = post_with_a_small_window(&base, &key, &body).await;
    let mut head = [0_u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let mut rest = Vec::new();
    let read_to_end = async {
        let mut buffer = [0_u8; 65536];
        loop {
            match stalled.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), read_to_end)
        .await
        .is_ok();
    let tail = String::from_utf8_lossy(&rest[rest.len().saturating_sub(200)..]).into_owned();
    assert!(
        closed && !tail.contains("[DONE]"),
        "a client that stopped reading kept its connection (closed: {closed}, {} bytes \
         read after, ending {tail:?})",
        rest.len()
    );

    // Its request was settled all the same: no hold is left.
    let mut holds = String::new();
    for _ in 0..100 {
        holds = cli.ok(&["--config", &config, "reservation", "list"]);
        if holds.lines().count() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(holds.lines().count(), 1, "holds left: {holds}");
}

/// A large non-streamed answer to a client that reads it slowly is written out
/// whole, although hyper takes all of it at once and the connection then has no
/// request in flight for longer than `header_read_timeout_secs`.
#[tokio::test]
async fn a_large_answer_read_slowly_arrives_whole() {
    use tokio::io::AsyncReadExt;

    let cli = Cli::new();
    let mock = upstream::MockUpstream::start().await;
    mock.set(|b| b.content = "x".repeat(4_000_000));
    let (config, key) = cli.slow_upstream(&mock, "header_read_timeout_secs = 1");
    let (mut server, base) = cli.serve(&config).await;
    let body = serde_json::json!({"model": "slow-model",
        "messages": [{"role": "user", "content": "hi"}]});
    let mut slow = post_with_a_small_window(&base, &key, &body).await;
    // About 1.3 MB/s: three seconds for the answer.
    let mut received = Vec::new();
    let mut buffer = [0_u8; 65536];
    let whole = loop {
        match slow.read(&mut buffer).await {
            Ok(0) | Err(_) => break None,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
        }
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
            let length: usize = head
                .lines()
                .find_map(|line| line.strip_prefix("content-length: "))
                .and_then(|n| n.trim().parse().ok())
                .expect("a content-length");
            if received.len() >= end + 4 + length {
                break Some(received.split_off(end + 4));
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    server.kill().unwrap();
    server.wait().unwrap();
    let whole =
        whole.unwrap_or_else(|| panic!("the answer was cut after {} bytes", received.len()));
    let answer: serde_json::Value = serde_json::from_slice(&whole).unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .map(str::len),
        Some(4_000_000)
    );
}

/// A connection with no request in flight for `header_read_timeout_secs` is
/// closed, whether its client sends nothing, trickles a request head a byte at a
/// time or keeps it alive after an answer, and so is one still trickling a body
/// past `request_body_timeout_secs`, on any route: such clients cannot pile up
/// until the server runs out of sockets (slowloris). A request in flight longer
/// than that (a slow upstream) is answered in full.
#[tokio::test]
async fn connections_idle_too_long_are_closed_and_requests_in_flight_are_not() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let cli = Cli::new();
    let mock = upstream::MockUpstream::start().await;
    mock.set(|b| b.delay = std::time::Duration::from_secs(3));
    let (config, key) = cli.slow_upstream(
        &mock,
        "header_read_timeout_secs = 1\nrequest_body_timeout_secs = 1",
    );
    let (mut server, base) = cli.serve(&config).await;
    let address = base.trim_start_matches("http://").to_owned();

    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    /// Connects, sends `start`, then a byte every 200 ms for up to 20 s: the read
    /// half, and the task that writes.
    async fn trickling(
        address: &str,
        start: &'static [u8],
    ) -> (tokio::net::tcp::OwnedReadHalf, tokio::task::JoinHandle<()>) {
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let (read, mut write) = stream.into_split();
        let writer = tokio::spawn(async move {
            write.write_all(start).await.unwrap();
            for _ in 0..100 {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                if write.write_all(b"a").await.is_err() {
                    return;
                }
            }
        });
        (read, writer)
    }
    // A head that never ends.
    let (mut trickling_read, trickle) = trickling(
        &address,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
    )
    .await;
    // A body trickled to a panel route that needs no sign-in.
    let (mut slow_body_read, dribble) = trickling(
        &address,
        b"POST /fn/logout HTTP/1.1\r\nHost: localhost\r\n\
          Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n",
    )
    .await;
    let mut kept_alive = tokio::net::TcpStream::connect(&address).await.unwrap();
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut answer = [0_u8; 12];
    kept_alive.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");

    /// Reads until the server closes the connection; false if it is still open
    /// after 10 s (ten times the timeout).
    async fn closed_by_server(stream: &mut (impl AsyncReadExt + Unpin)) -> bool {
        let mut buffer = [0_u8; 1024];
        let read_to_end = async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read_to_end)
            .await
            .is_ok()
    }
    let slow_request = slow_chat(&reqwest::Client::new(), &base, &key).send();
    let (silent_closed, trickling_closed, slow_body_closed, kept_alive_closed, slow_answer) = tokio::join!(
        closed_by_server(&mut silent),
        closed_by_server(&mut trickling_read),
        closed_by_server(&mut slow_body_read),
        closed_by_server(&mut kept_alive),
        slow_request,
    );
    trickle.abort();
    dribble.abort();
    server.kill().unwrap();
    server.wait().unwrap();
    assert!(silent_closed, "a connection that sent nothing stayed open");
    assert!(
        trickling_closed,
        "a connection trickling its headers stayed open"
    );
    assert!(
        kept_alive_closed,
        "an idle kept-alive connection stayed open"
    );
    assert!(
        slow_body_closed,
        "a connection trickling a body stayed open"
    );
    let slow_answer = slow_answer.unwrap();
    assert_eq!(slow_answer.status(), reqwest::StatusCode::OK);
    assert_eq!(slow_answer.headers()["x-tollgate-model"], "slow-model");
}

/// A `serve` that cannot listen (another server runs on the address) changes
/// nothing: the workspace name and plan of its config do not reach the database
/// that other server bills against.
#[tokio::test]
async fn a_serve_that_cannot_listen_changes_nothing() {
    let cli = Cli::new();
    let first = cli.dir.path().join("first.toml");
    std::fs::write(
        &first,
        "[workspace]\nname = \"Acme\"\n[plan]\nbudget_eur = \"100\"\n",
    )
    .unwrap();
    // Any command applies the config to a new database.
    cli.ok(&["--config", first.to_str().unwrap(), "reservation", "list"]);
    let store = cli.store().await;
    let before = store.spend_snapshot(chrono::Utc::now()).await.unwrap().plan;

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = taken.local_addr().unwrap().to_string();
    let other = cli.dir.path().join("other.toml");
    std::fs::write(
        &other,
        "[workspace]\nname = \"Other\"\n[plan]\nbudget_eur = \"7\"\n",
    )
    .unwrap();
    let error = cli.fails(&[
        "--config",
        other.to_str().unwrap(),
        "serve",
        "--listen",
        &listen,
    ]);
    assert!(
        error.contains(&format!("could not listen on {listen}")),
        "{error}"
    );
    assert_eq!(store.workspace().await.unwrap().name, "Acme");
    let after = store.spend_snapshot(chrono::Utc::now()).await.unwrap().plan;
    assert_eq!(after, before);
    assert_eq!(
        before.amounts.budget,
        app::domain::Nanos::new(100_000_000_000),
        "€100"
    );
}

/// Logging to a stderr whose reader has gone away (`tollgate serve 2>&1 |
/// shipper`, the shipper restarting) stops nothing: the server keeps serving
/// requests that log, and a command whose error cannot be shown still exits 1,
/// not with a panic.
#[tokio::test]
async fn a_closed_log_pipe_stops_nothing() {
    let cli = Cli::new();
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    // An upstream nobody listens on: each request logs a warning.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", nobody.local_addr().unwrap());
    drop(nobody);
    let (config, key) = cli.upstream_at(&base_url, "");

    let refused = cli
        .command(
            &[
                "--config",
                &config,
                "limit",
                "set",
                "no-such-model",
                "--eur",
                "5",
            ],
            None,
        )
        .stderr(closed())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");

    let (mut server, base) = cli.serve_logging_to(&config, closed().into()).await;
    let client = reqwest::Client::new();
    for _ in 0..3 {
        let response = slow_chat(&client, &base, &key)
            .send()
            .await
            .expect("the server answers after logging to a closed pipe");
        assert_eq!(response.status(), 502);
    }
    assert_eq!(server.try_wait().unwrap(), None, "the server stopped");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// `demo` refused for its password (missing, too short) changes nothing: it
/// would otherwise apply its own config (plan, catalog, workspace) first.
#[test]
fn demo_refused_for_its_password_changes_nothing() {
    let cli = Cli::new();
    let config = cli.dir.path().join("own.toml");
    std::fs::write(
        &config,
        "[workspace]\nname = \"Own\"\n[plan]\nbudget_eur = \"20\"\n",
    )
    .unwrap();
    let config = config.display().to_string();
    // The database is set up from the operator's config.
    cli.ok(&["--config", &config, "audit"]);
    let before = cli.ok(&["audit"]);
    for password in [None, Some("short")] {
        let refused = cli.run_with(&["demo"], password);
        assert!(!refused.status.success(), "{password:?}");
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("TOLLGATE_PASSWORD")
                || String::from_utf8_lossy(&refused.stderr).contains("at least 12 characters"),
            "{password:?}: {}",
            String::from_utf8_lossy(&refused.stderr)
        );
        assert_eq!(
            cli.ok(&["audit"]),
            before,
            "{password:?}: the books changed"
        );
    }
}

/// Help names the environment variables it reads, never their values: the
/// database URL's may hold a password.
#[test]
fn help_shows_no_environment_values() {
    for args in [&["--help"][..], &["serve", "--help"]] {
        let output = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .env("TOLLGATE_DATABASE_URL", "postgres://app:s3cret@db/books")
            .env("TOLLGATE_CONFIG", "/etc/tollgate/secret-name.toml")
            .env("TOLLGATE_LISTEN", "10.9.8.7:8080")
            .output()
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(help.contains("[env: TOLLGATE_DATABASE_URL]"), "{help}");
        for value in ["s3cret", "secret-name", "10.9.8.7"] {
            assert!(!help.contains(value), "{value} in {help}");
        }
    }
}

/// A command refused for its arguments or its password stops before the
/// database is opened: it leaves no SQLite file where there was none.
#[test]
fn a_refused_command_makes_no_database_file() {
    let cli = Cli::new();
    let file = cli.dir.path().join("tollgate.db");
    let long_name = "m".repeat(4000);
    let long_local = format!("{}@example.com", "a".repeat(65));
    let long_email = format!("a@{}.com", "b".repeat(250));
    let refused: [(&[&str], Option<&str>, &str); 16] = [
        (
            &["user", "create", "--email", "nobody", "--role", "admin"],
            Some("a long enough password"),
            "is not an email address",
        ),
        (
            &["user", "create", "--email", &long_local, "--role", "admin"],
            Some("a long enough password"),
            "the part before the @ is 65 bytes long; it has at most 64 (RFC 5321)",
        ),
        (
            &["user", "create", "--email", &long_email, "--role", "admin"],
            Some("a long enough password"),
            "is 256 bytes long; an email address has at most 254 (RFC 5321)",
        ),
        (
            &[
                "user",
                "create",
                "--email",
                "a@example.com",
                "--role",
                "admin",
            ],
            Some("short"),
            "at least 12 characters",
        ),
        (
            &["key", "create", "--email", "a@example.com", "--name", " "],
            None,
            "--name must not be empty",
        ),
        // A user's email that could name no user.
        (
            &["key", "create", "--email", "bad", "--name", "ci"],
            None,
            "--email \"bad\" is not an email address",
        ),
        (
            &["key", "list", "--email", "@example.com"],
            None,
            "is not an email address",
        ),
        (
            &["user", "disable", "--email", "bad"],
            None,
            "is not an email address",
        ),
        (
            &["user", "enable", "--email", "a@"],
            None,
            "is not an email address",
        ),
        (
            &["user", "password", "--email", "bad"],
            Some("a long enough password"),
            "is not an email address",
        ),
        (
            &["limit", "set", "gpt-5", "--eur", "twelve"],
            None,
            "--eur \"twelve\"",
        ),
        // A model name no catalog can hold.
        (
            &["limit", "set", "gpt\u{1b}-5", "--eur", "5"],
            None,
            "\"gpt\\u{1b}-5\" cannot be a model's id or alias",
        ),
        (
            &["limit", "clear", ""],
            None,
            "cannot be a model's id or alias",
        ),
        (
            &["limit", "clear", &long_name],
            None,
            "a model name is 4000 characters long; an id or alias has at most 200",
        ),
        (&["demo"], None, "TOLLGATE_PASSWORD"),
        (
            &["replay", "run", "--key", "tg-none", "--code-model", "nope"],
            None,
            "--code-model \"nope\" is not a model",
        ),
    ];
    for (args, password, expected) in refused {
        let output = cli.run_with(args, password);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!file.exists(), "{args:?} made the database file");
    }
}

/// A command closes its connections before it ends, and checkpoints the WAL
/// into the file: a copy of the file alone holds what the command did. (The
/// `-wal` file is deleted too, but now and then stays, empty.)
#[test]
fn a_command_leaves_the_database_file_alone_holding_the_books() {
    let cli = Cli::new();
    cli.must_create_user("owner@example.com", "admin");
    cli.ok(&["limit", "set", "gpt-5", "--eur", "12.50"]);
    let wal = cli.dir.path().join("tollgate.db-wal");
    assert_eq!(
        std::fs::metadata(&wal).map_or(0, |wal| wal.len()),
        0,
        "tollgate.db-wal holds writes"
    );
    // The copy, opened elsewhere, has the limit and the user.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(
        cli.dir.path().join("tollgate.db"),
        copy.path().join("tollgate.db"),
    )
    .unwrap();
    let copied = tollgate_on(
        &format!("sqlite://{}", copy.path().join("tollgate.db").display()),
        &["audit"],
    )
    .output()
    .unwrap();
    let audit = String::from_utf8_lossy(&copied.stdout);
    assert!(
        audit.contains("owner@example.com") && audit.contains("12.5"),
        "{audit}"
    );
}

/// A SQLite URL that opens the file read-only is refused before anything is
/// made: every command writes, so SQLite would make an empty file and fail.
#[test]
fn a_read_only_sqlite_url_is_refused_and_makes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (query, named) in [
        ("mode=ro", "(mode=ro)"),
        ("immutable=1", "(immutable)"),
        ("mode=rw", "mode=rw does not create it"),
    ] {
        let url = format!("sqlite://{}?{query}", dir.path().join("t.db").display());
        let output = tollgate_on(&url, &["user", "list"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{query}");
        assert!(
            stderr.contains("--database-url") && stderr.contains(named),
            "{query}: {stderr}"
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{query} left a file"
        );
    }
}

/// `demo` books its usage in a cycle without spend only: once the plan's start
/// date moves the current cycle's bounds (R1), the usage already booked moves
/// with it, and running `demo` again adds nothing on top.
#[tokio::test]
async fn demo_usage_is_not_booked_again_after_the_cycle_moves() {
    let cli = Cli::new();
    let first = cli.run_with(&["demo"], Some("a demo password"));
    let said = String::from_utf8_lossy(&first.stdout);
    assert!(
        first.status.success() && said.contains("recorded 3 demo usage events"),
        "{said} {}",
        String::from_utf8_lossy(&first.stderr)
    );
    let spent = || async {
        let store = cli.store().await;
        let snapshot = store.spend_snapshot(chrono::Utc::now()).await.unwrap();
        let ledger = store.ledger_totals(snapshot.cycle.start).await.unwrap();
        (snapshot.cycle.start, snapshot.workspace.spent, ledger.total)
    };
    let (first_start, booked, ledger) = spent().await;
    assert!(booked.get() > 0);
    assert_eq!(ledger, booked);

    // The embedded plan renews on the 1st; this one on the 15th.
    let config = cli.dir.path().join("moved.toml");
    std::fs::write(&config, "[plan]\nstart = \"2026-01-15\"\n").unwrap();
    let config = config.display().to_string();
    let again = cli.run_with(&["demo", "--config", &config], Some("a demo password"));
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success() && said.contains("already has spend: no demo usage added"),
        "{said} {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let (start, spent_now, ledger) = spent().await;
    assert_ne!(start, first_start, "the cycle was recut");
    assert_eq!((spent_now, ledger), (booked, booked));
}

/// A settlement the database could not take before its answer went out
/// (another process held SQLite's write lock through the request's tries) is
/// written to the settlement spool beside the database file first: a server
/// stopped by SIGTERM before the lock ends loses none, and the next start
/// bills it, once (DESIGN.md R7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_pending_at_shutdown_is_billed_by_the_next_start() {
    use std::time::Duration;
    let cli = Cli::new();
    let mock = upstream::MockUpstream::start().await;
    let (config, key) = cli.slow_upstream(&mock, "");
    let (mut server, base) = cli.serve(&config).await;
    let client = reqwest::Client::new();
    let chat = || slow_chat(&client, &base, &key).send();
    let first = chat().await.unwrap();
    assert_eq!(first.status(), 200);
    let _ = first.bytes().await.unwrap();
    let store = cli.store().await;
    let spent = |snapshot: app::store::SpendSnapshot| snapshot.workspace;
    let one = spent(store.spend_snapshot(chrono::Utc::now()).await.unwrap());
    assert!(one.spent.get() > 0);

    mock.set(|b| b.delay = Duration::from_millis(1500));
    let (answer, holder) = tokio::join!(
        async {
            let response = chat().await.unwrap();
            (response.status(), response.bytes().await.unwrap())
        },
        async {
            // Taken once the request is admitted, before its upstream answers.
            tokio::time::sleep(Duration::from_millis(500)).await;
            lock::WriteLockHolder::take(&cli.url()).await
        }
    );
    assert_eq!(answer.0, 200, "{:?}", answer.1);
    let spool = cli.dir.path().join("tollgate.db-settlements");
    let entries = || -> Vec<String> {
        match std::fs::read_dir(&spool) {
            Ok(listing) => listing
                .map(|item| item.unwrap().file_name().into_string().unwrap())
                .filter(|name| name.ends_with(".json"))
                .collect(),
            Err(_) => Vec::new(),
        }
    };
    assert_eq!(entries().len(), 1, "spooled before the answer went out");
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_settlements_total{kind=\"spooled\",model=\"slow-model\"} 1"),
        "{metrics}"
    );

    server.terminate();
    let exited = server
        .exited_within(Duration::from_secs(30))
        .await
        .expect("the server stops within 30 s of SIGTERM");
    assert!(exited.success(), "{exited:?}");
    assert_eq!(entries().len(), 1, "still waiting in the spool");
    holder.release().await;
    let stopped = spent(store.spend_snapshot(chrono::Utc::now()).await.unwrap());
    assert_eq!(stopped.spent, one.spent, "not billed before the next start");

    let (mut server, _) = cli.serve(&config).await;
    let restarted = spent(store.spend_snapshot(chrono::Utc::now()).await.unwrap());
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(restarted.spent.get(), 2 * one.spent.get());
    assert_eq!(restarted.reserved.get(), 0);
    assert_eq!(entries(), Vec::<String>::new());
}

/// A server stopped by SIGTERM closes its connections and checkpoints the
/// WAL: its SQLite file alone then holds the books.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_leaves_its_books_in_the_file_alone() {
    let cli = Cli::new();
    let mock = upstream::MockUpstream::start().await;
    let (config, key) = cli.slow_upstream(&mock, "");
    let (mut server, base) = cli.serve(&config).await;
    let answer = slow_chat(&reqwest::Client::new(), &base, &key)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let _ = answer.bytes().await.unwrap();
    let beside = |suffix: &str| cli.dir.path().join(format!("tollgate.db{suffix}"));
    assert!(beside("-wal").exists(), "a serving database has its WAL");
    let spent = |file: &std::path::Path| {
        let output = tollgate_on(
            &format!("sqlite://{}", file.display()),
            &["spend", "--json"],
        )
        .output()
        .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        report["spent_eur"]
            .as_str()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .unwrap()
    };
    let served = spent(&beside(""));
    assert!(served > rust_decimal::Decimal::ZERO);
    server.terminate();
    let exited = server
        .exited_within(std::time::Duration::from_secs(30))
        .await
        .expect("the server stops within 30 s of SIGTERM");
    assert!(exited.success(), "{exited:?}");
    assert_eq!(
        std::fs::metadata(beside("-wal")).map_or(0, |wal| wal.len()),
        0,
        "tollgate.db-wal holds writes"
    );
    // A copy of the file alone has the request's spend.
    let copy = tempfile::tempdir().unwrap();
    std::fs::copy(beside(""), copy.path().join("tollgate.db")).unwrap();
    assert_eq!(spent(&copy.path().join("tollgate.db")), served);
}

/// A settlement spool folder that cannot take entries (a file stands in its
/// place) stops `serve` at start with the key named, before the database is
/// touched, instead of failing the first settlement that needs it.
#[test]
fn serve_refuses_a_spool_folder_it_cannot_write() {
    let cli = Cli::new();
    let blocker = cli.dir.path().join("not-a-folder");
    std::fs::write(&blocker, b"").unwrap();
    // One that fails part of the way (a name too long) leaves none of the
    // folders it made.
    let made = cli.dir.path().join("made");
    let config = cli.dir.path().join("tollgate.toml");
    for spool in [
        blocker.join("settlements"),
        made.join("for").join("x".repeat(300)).join("spool"),
    ] {
        std::fs::write(
            &config,
            format!("settlement_spool = \"{}\"\n", spool.display()),
        )
        .unwrap();
        let error = cli.fails(&[
            "--config",
            config.to_str().unwrap(),
            "serve",
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(
            error.contains("invalid config: `settlement_spool`: cannot keep settlements in"),
            "{error}"
        );
        assert!(
            !cli.dir.path().join("tollgate.db").exists(),
            "the database was touched"
        );
        assert!(!made.exists(), "the folders made for the spool were left");
    }
}

/// A SQLite file in a folder that does not exist (a mistyped path) stops
/// `serve` with the URL's key named, instead of creating the folders and
/// serving empty books there.
#[test]
fn serve_refuses_a_sqlite_file_whose_folder_is_missing() {
    let cli = Cli::new();
    let missing = cli.dir.path().join("missing");
    let url = format!("sqlite://{}", missing.join("books.db").display());
    let config = cli.dir.path().join("tollgate.toml");
    std::fs::write(&config, format!("database_url = \"{url}\"\n")).unwrap();
    let config = config.to_str().unwrap();
    for (args, key) in [
        (
            ["serve", "--listen", "127.0.0.1:0", "--database-url", &url],
            "--database-url",
        ),
        (
            ["serve", "--listen", "127.0.0.1:0", "--config", config],
            "`database_url`",
        ),
    ] {
        let error = serve_expecting_failure(&args, cli.dir.path());
        assert!(
            error.contains(key) && error.contains("does not exist"),
            "{args:?}: {error}"
        );
        assert!(!missing.exists(), "{args:?}: the folder was created");
    }
}

/// `serve` whose database cannot be opened stops naming the key the URL came
/// from, and leaves behind none of the folders it made for the settlement
/// spool: neither the default one in the working directory (PostgreSQL) nor a
/// named one and its parents.
#[test]
fn serve_that_cannot_open_its_database_names_the_key_and_leaves_no_folder() {
    let cli = Cli::new();
    // Nothing listens on the discard port: the connection is refused at once.
    let url = "postgres://postgres:secret@127.0.0.1:9/tollgate";
    let config = cli.dir.path().join("tollgate.toml");
    let spool = cli.dir.path().join("made").join("for").join("spool");
    std::fs::write(
        &config,
        format!(
            "database_url = \"{url}\"\nsettlement_spool = \"{}\"\n",
            spool.display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    for (args, key) in [
        (
            vec!["serve", "--listen", "127.0.0.1:0", "--database-url", url],
            "`TOLLGATE_DATABASE_URL / --database-url`",
        ),
        (
            vec!["serve", "--listen", "127.0.0.1:0", "--config", config],
            "`database_url`",
        ),
    ] {
        let error = serve_expecting_failure(&args, cli.dir.path());
        assert!(
            error.contains(&format!(
                "{key} (postgres://postgres:***@127.0.0.1:9/tollgate)"
            )) && error.contains("could not open the database")
                && !error.contains("secret"),
            "{args:?}: {error}"
        );
        assert!(
            !cli.dir.path().join("tollgate-settlements").exists(),
            "{args:?}: the default spool folder was left"
        );
        assert!(
            !cli.dir.path().join("made").exists(),
            "{args:?}: the named spool's folders were left"
        );
    }
}

/// Runs `tollgate` with `args` in `dir`, without the caller's `TOLLGATE_*`
/// variables, expecting it to stop with an error within a minute (a server
/// that starts instead is killed and fails the test); returns its stderr.
fn serve_expecting_failure(args: &[&str], dir: &std::path::Path) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    command.args(args).current_dir(dir);
    for (name, _) in std::env::vars() {
        if name.starts_with("TOLLGATE_") {
            command.env_remove(name);
        }
    }
    // Spawned, not run to its end: a server that starts would never end.
    let mut server = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while server.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            server.kill().unwrap();
            server.wait().unwrap();
            panic!("{args:?} served instead of stopping");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let output = server.wait_with_output().unwrap();
    assert!(!output.status.success(), "{args:?} ended without an error");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `serve` started while another process holds the SQLite file's write lock
/// (a backup, a shell inside a transaction) waits for it, saying so, and serves
/// once it is let go, instead of ending after one 10 s wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_waits_for_a_lock_held_at_start() {
    use std::time::Duration;
    let cli = Cli::new();
    let config = cli.dir.path().join("tollgate.toml");
    std::fs::write(&config, "[workspace]\nname = \"Acme\"\n").unwrap();
    let config = config.to_str().unwrap();
    // The database exists before the lock is taken.
    cli.ok(&["--config", config, "reservation", "list"]);
    let holder = lock::WriteLockHolder::take(&cli.url()).await;

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = cli.dir.path().join("serve.log");
    let server = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["--config", config, "serve", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--database-url", &cli.url()])
        .current_dir(cli.dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server(server);
    // Past the first try's 10 s wait.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(server.try_wait().unwrap().is_none(), "serve gave up");
    holder.release().await;

    let client = reqwest::Client::new();
    let mut up = false;
    for _ in 0..150 {
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "not serving 15 s after the lock was let go");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("waiting to apply the config"), "{logged}");
}
