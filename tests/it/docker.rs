//! The Docker files, checked without a Docker engine: the compose files parse and point at files
//! that exist, the Dockerfiles copy what the build needs, are laid out as the prebuilt-binary build
//! expects and set only variables that `qtune serve` reads, and the binary started with the image's
//! environment (ports and paths moved to a temporary place) serves /healthz and an open /v1 API.
//! `.ci/run` then builds the image and runs docker-compose.yml for real: scripts/docker-check.sh.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::CommandFactory;
use serde_yaml::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn yaml(name: &str) -> Value {
    serde_yaml::from_str(&std::fs::read_to_string(root().join(name)).unwrap()).unwrap()
}

/// The environment variables `qtune serve` reads, from its own argument definitions.
fn serve_env_vars() -> Vec<String> {
    let cli = qtune::cli::Cli::command();
    let serve = cli.find_subcommand("serve").unwrap();
    serve
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().to_string()))
        .collect()
}

/// Variables a container may carry that are not qtune's own flags.
/// (The AWS_* ones configure the S3 artifact store, as object_store reads them.)
const OTHER_KNOWN_VARS: [&str; 9] = [
    "HF_HOME",
    "HF_TOKEN",
    "QTUNE_LOG",
    "CUDA_COMPUTE_CAP",
    "AWS_ENDPOINT_URL",
    "AWS_ALLOW_HTTP",
    "AWS_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
];

fn assert_known_var(name: &str, file: &str) {
    let known = serve_env_vars();
    assert!(
        known.iter().any(|k| k == name) || OTHER_KNOWN_VARS.contains(&name),
        "{file} sets {name}, which qtune serve does not read (it reads {known:?})"
    );
}

/// One build stage: the image or stage it starts from, its name, its instructions.
struct Stage {
    from: String,
    name: Option<String>,
    body: Vec<(String, String)>,
}

/// `ENV A=1 B=2` instructions of a Dockerfile, with line continuations joined.
struct Dockerfile {
    name: String,
    instructions: Vec<(String, String)>,
}

impl Dockerfile {
    fn read(name: &str) -> Dockerfile {
        let text = std::fs::read_to_string(root().join(name)).unwrap();
        let joined = text.replace("\\\n", " ");
        let instructions = joined
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
                (op.to_uppercase(), rest.trim().to_string())
            })
            .collect();
        Dockerfile {
            name: name.into(),
            instructions,
        }
    }

    fn all(&self, op: &str) -> Vec<&str> {
        self.instructions
            .iter()
            .filter(|(o, _)| o == op)
            .map(|(_, r)| r.as_str())
            .collect()
    }

    /// Global `ARG NAME=default` lines (before the first FROM).
    fn global_args(&self) -> BTreeMap<String, String> {
        let first_from = self
            .instructions
            .iter()
            .position(|(o, _)| o == "FROM")
            .unwrap();
        let mut args = BTreeMap::new();
        for (op, rest) in &self.instructions[..first_from] {
            if op == "ARG" {
                let (k, v) = rest.split_once('=').expect("ARG NAME=default");
                // defaults may name earlier arguments: ${CUDA_VERSION}
                let v = args
                    .iter()
                    .fold(v.to_string(), |v, (name, value): (&String, &String)| {
                        v.replace(&format!("${{{name}}}"), value)
                    });
                args.insert(k.to_string(), v);
            }
        }
        args
    }

    /// The build stages, in order.
    fn stages(&self) -> Vec<Stage> {
        let mut stages: Vec<Stage> = Vec::new();
        for (op, rest) in &self.instructions {
            if op == "FROM" {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => Some(name.to_string()),
                    _ => None,
                };
                stages.push(Stage {
                    from: words[0].to_string(),
                    name,
                    body: Vec::new(),
                });
            } else if let Some(last) = stages.last_mut() {
                last.body.push((op.clone(), rest.clone()));
            }
        }
        stages
    }

    fn stage(&self, name: &str) -> Stage {
        self.stages()
            .into_iter()
            .find(|s| s.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("{}: no stage {name}", self.name))
    }

    /// ENV of the `runtime` stage, which both images the Dockerfile makes are built on.
    fn runtime_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for (op, rest) in self.stage("runtime").body {
            if op == "ENV" {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                    env.insert(k.to_string(), v.to_string());
                }
            }
        }
        env
    }

    /// The image a base-image argument defaults to: `${RUNTIME_IMAGE}` → `debian:bookworm-slim`.
    fn default_image(&self, from: &str) -> String {
        let arg = from
            .strip_prefix("${")
            .and_then(|f| f.strip_suffix('}'))
            .unwrap_or_else(|| {
                panic!(
                    "{}: the base image {from} is not a build argument",
                    self.name
                )
            });
        self.global_args()[arg].clone()
    }

    fn check(&self) {
        // every COPY from the repository's context exists (`prebuilt` has a context of its own: a
        // folder holding the binary)
        let repo_copies = self
            .stages()
            .into_iter()
            .filter(|s| s.name.as_deref() != Some("prebuilt"))
            .flat_map(|s| s.body)
            .filter(|(op, rest)| op == "COPY" && !rest.starts_with("--from"));
        for (_, copy) in repo_copies {
            let parts: Vec<&str> = copy.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(
                    root().join(src).exists(),
                    "{}: COPY {src}: no such path",
                    self.name
                );
            }
        }
        // what `include_str!` (OpenAPI, dashboard) and `sqlx::migrate!` read at compile time is copied in
        let copied: Vec<&str> = self.all("COPY");
        for needed in ["Cargo.lock", "src", "migrations", "openapi", "web"] {
            assert!(
                copied
                    .iter()
                    .any(|c| c.split_whitespace().any(|p| p == needed)),
                "{}: the build needs {needed}",
                self.name
            );
        }
        let env = self.runtime_env();
        for name in env.keys() {
            assert_known_var(name, &self.name);
        }
        let port = env["QTUNE_LISTEN"].rsplit(':').next().unwrap().to_string();
        assert!(
            env["QTUNE_LISTEN"].starts_with("0.0.0.0:"),
            "listens on all interfaces"
        );
        assert_eq!(self.all("EXPOSE"), [port.as_str()], "{}", self.name);
        assert!(self.all("VOLUME")[0].contains(&format!("\"{}\"", env["QTUNE_DATA_DIR"])));
        let health = self.all("HEALTHCHECK").join(" ");
        assert!(
            health.contains(&format!("http://127.0.0.1:{port}/healthz")),
            "{}: {health}",
            self.name
        );
        // the default target and `--target prebuilt` are the runtime stage plus the binary, run as
        // a non-root user
        let stages = self.stages();
        let last = stages.last().unwrap();
        assert_eq!(last.from, "runtime", "{}: the default target", self.name);
        assert!(last.name.is_none());
        let prebuilt = self.stage("prebuilt");
        assert_eq!(prebuilt.from, "runtime");
        for (what, body) in [("default", &last.body), ("prebuilt", &prebuilt.body)] {
            let copies_binary = body
                .iter()
                .any(|(o, r)| o == "COPY" && r.ends_with(" /usr/local/bin/qtune"));
            assert!(
                copies_binary,
                "{}: {what} target installs the binary",
                self.name
            );
            let user = body
                .iter()
                .rev()
                .find(|(o, _)| o == "USER")
                .map(|(_, r)| r.as_str());
            assert!(
                matches!(user, Some(u) if u != "root" && u != "0"),
                "{}: {what} target runs as a non-root user",
                self.name
            );
        }
        // `prebuilt` comes before the compiling stage: stages are built in order up to the target
        let position = |n: &str| stages.iter().position(|s| s.name.as_deref() == Some(n));
        assert!(position("prebuilt") < position("build"), "{}", self.name);
        // base images are build arguments whose defaults are the public images
        for Stage { from, name, .. } in &stages {
            if from != "runtime" {
                let image = self.default_image(from);
                assert!(
                    image.contains(':'),
                    "{}: stage {name:?} from {image}",
                    self.name
                );
            }
        }
        assert_eq!(self.all("ENTRYPOINT"), ["[\"qtune\"]"]);
    }
}

#[test]
fn dockerfiles_copy_what_the_build_needs_and_set_only_known_variables() {
    let cpu = Dockerfile::read("docker/Dockerfile");
    cpu.check();
    let cuda = Dockerfile::read("docker/Dockerfile.cuda");
    cuda.check();
    assert!(cuda
        .all("RUN")
        .iter()
        .any(|r| r.contains("cargo build --release --locked --features cuda")));
    for stage in ["runtime", "build"] {
        assert!(cuda
            .default_image(&cuda.stage(stage).from)
            .starts_with("nvidia/cuda:"));
    }
    assert_eq!(
        cpu.default_image(&cpu.stage("runtime").from),
        "debian:bookworm-slim"
    );
    assert_eq!(
        cpu.default_image(&cpu.stage("build").from),
        "rust:1.95-bookworm"
    );
    assert_eq!(cuda.runtime_env()["QTUNE_DEVICES"], "cuda:0");
    assert_eq!(cpu.runtime_env()["QTUNE_DEVICES"], "cpu");
}

#[test]
fn compose_files_parse_and_their_references_exist() {
    let compose = yaml("docker-compose.yml");
    let service = &compose["services"]["qtune"];
    let dockerfile = service["build"]["dockerfile"].as_str().unwrap();
    assert!(root().join(dockerfile).is_file(), "{dockerfile}");
    assert_eq!(service["build"]["context"], ".");
    let ports: Vec<&str> = service["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let image_env = Dockerfile::read(dockerfile).runtime_env();
    let container_port = image_env["QTUNE_LISTEN"].rsplit(':').next().unwrap();
    assert!(
        ports[0].ends_with(&format!(":{container_port}")),
        "{ports:?}"
    );
    // the data dir is a named volume declared at the top level
    let mount = service["volumes"][0].as_str().unwrap();
    let (volume, target) = mount.split_once(':').unwrap();
    assert_eq!(target, image_env["QTUNE_DATA_DIR"]);
    assert!(
        compose["volumes"].get(volume).is_some(),
        "{volume} declared"
    );
    let health: Vec<&str> = service["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(health
        .last()
        .unwrap()
        .ends_with(&format!(":{container_port}/healthz")));
    let env = service["environment"].as_mapping().unwrap();
    assert!(
        env.contains_key("QTUNE_API_KEYS"),
        "API keys from the environment"
    );
    for k in env.keys() {
        assert_known_var(k.as_str().unwrap(), "docker-compose.yml");
    }

    let gpu = yaml("docker-compose.gpu.yml");
    let g = &gpu["services"]["qtune"];
    let cuda_file = g["build"]["dockerfile"].as_str().unwrap();
    assert!(root().join(cuda_file).is_file(), "{cuda_file}");
    assert!(cuda_file.ends_with("Dockerfile.cuda"));
    let device = &g["deploy"]["resources"]["reservations"]["devices"][0];
    assert_eq!(device["driver"], "nvidia");
    assert_eq!(device["capabilities"][0], "gpu");
    for k in g["environment"].as_mapping().unwrap().keys() {
        assert_known_var(k.as_str().unwrap(), "docker-compose.gpu.yml");
    }
}

#[test]
fn the_scale_out_compose_file_runs_api_replicas_and_workers_on_one_database() {
    let mut compose = yaml("docker-compose.scale.yml");
    compose.apply_merge().unwrap();
    let services = &compose["services"];
    let command = |name: &str| -> Vec<String> {
        services[name]["command"]
            .as_sequence()
            .unwrap_or_else(|| panic!("{name} has a command"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(command("qtune-api"), ["serve", "--workers", "0"]);
    assert_eq!(command("qtune-worker")[0], "worker");
    let database = |name: &str| {
        services[name]["environment"]["QTUNE_DATABASE"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(database("qtune-api").starts_with("postgres://"));
    assert_eq!(database("qtune-api"), database("qtune-worker"));
    assert!(database("qtune-api").contains("@postgres:5432/"));
    for name in ["qtune-api", "qtune-worker"] {
        let service = &services[name];
        assert!(root()
            .join(service["build"]["dockerfile"].as_str().unwrap())
            .is_file());
        for k in service["environment"].as_mapping().unwrap().keys() {
            assert_known_var(k.as_str().unwrap(), "docker-compose.scale.yml");
        }
        // every qtune process sees the same artifacts: the S3 store, at the MinIO service
        let env = &service["environment"];
        assert!(env["QTUNE_ARTIFACTS"]
            .as_str()
            .unwrap()
            .starts_with("s3://"));
        assert!(env["AWS_ENDPOINT_URL"]
            .as_str()
            .unwrap()
            .starts_with("http://minio:9000"));
        assert_eq!(
            env["AWS_ACCESS_KEY_ID"],
            services["minio"]["environment"]["MINIO_ROOT_USER"]
        );
        assert_eq!(service["deploy"]["replicas"], 2);
    }
    // the worker's health port is the one its healthcheck asks
    let health_listen = command("qtune-worker")[2].clone();
    let port = health_listen.rsplit(':').next().unwrap();
    let check = services["qtune-worker"]["healthcheck"]["test"][3]
        .as_str()
        .unwrap();
    assert!(check.contains(&format!(":{port}/")), "{check}");
    // the proxy's config exists and sends to the API replicas' port
    let mount = services["proxy"]["volumes"][0].as_str().unwrap();
    let conf = std::fs::read_to_string(root().join(mount.split(':').next().unwrap())).unwrap();
    assert!(conf.contains("server qtune-api:8080"), "{conf}");
    assert!(
        conf.contains("proxy_buffering off"),
        "SSE must not be buffered"
    );
    assert!(compose["volumes"].get("qtune-minio").is_some());
}

/// The compose default `${VAR:-}` yields variables that are set but empty; the server must read
/// that as "not configured" (an empty API key list, not one empty key).
#[test]
fn the_binary_serves_with_the_images_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut env = Dockerfile::read("docker/Dockerfile").runtime_env();
    env.insert("QTUNE_LISTEN".into(), format!("127.0.0.1:{port}"));
    env.insert(
        "QTUNE_DATA_DIR".into(),
        tmp.path().join("data").display().to_string(),
    );
    env.insert(
        "HF_HOME".into(),
        tmp.path().join("hf").display().to_string(),
    );
    let compose = yaml("docker-compose.yml");
    for (k, v) in compose["services"]["qtune"]["environment"]
        .as_mapping()
        .unwrap()
    {
        // what compose substitutes when the variable is unset: the text after `:-`
        let v = v.as_str().unwrap();
        let value = v
            .strip_prefix("${")
            .and_then(|s| s.strip_suffix('}'))
            .and_then(|s| s.split_once(":-"))
            .map(|(_, default)| default.to_string())
            .unwrap_or_else(|| v.to_string());
        env.insert(k.as_str().unwrap().to_string(), value);
    }
    assert_eq!(env["QTUNE_API_KEYS"], "");
    let mut server = std::process::Command::new(env!("CARGO_BIN_EXE_qtune"))
        .arg("serve")
        .envs(&env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::blocking::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let health = loop {
        match client.get(format!("{base}/healthz")).send() {
            Ok(r) => break r.status(),
            Err(_) if started.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("server never answered: {e}"),
        }
    };
    let jobs = client
        .get(format!("{base}/v1/jobs"))
        .send()
        .unwrap()
        .status();
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(health, 200);
    assert_eq!(jobs, 200, "no API keys configured: /v1 is open");
    assert!(tmp.path().join("data/qtune.db").is_file());
}
