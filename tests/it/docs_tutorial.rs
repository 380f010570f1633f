//! The README's tutorial, run as written, so the docs cannot rot: its
//! ```` ```sh tutorial-serve ```` block starts `cmk-proxy dev`, its
//! ```` ```sh tutorial ```` blocks run in one shell against it, and each is
//! followed by the ```` ```text tutorial-output ```` it claims. Also: every
//! relative link in README.md and docs/ points at a file and heading that
//! exist, every `cmk-proxy …` command shown parses with the real CLI, and
//! the policy examples of docs/CONFIGURATION.md parse.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::clients::require_command;
use common::*;

/// Hang guard for the demo's start and for the tutorial's commands.
const HANG_GUARD: Duration = Duration::from_secs(300);

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fenced block of a Markdown file: its info string and its text.
#[derive(Debug)]
struct Fence {
    info: String,
    text: String,
}

fn fences(markdown: &str) -> Vec<Fence> {
    let mut out = Vec::new();
    let mut open: Option<Fence> = None;
    for line in markdown.lines() {
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Fence {
                    info: info.trim().to_owned(),
                    text: String::new(),
                })
            }
            (Some(_), Some(rest)) if rest.trim().is_empty() => out.extend(open.take()),
            (Some(fence), _) => {
                fence.text.push_str(line);
                fence.text.push('\n');
            }
            (None, None) => {}
        }
    }
    out
}

/// The tutorial of README.md: the serve command's arguments after
/// `scripts/dev.sh`, and each step's commands with the output it claims.
struct Tutorial {
    serve_args: Vec<String>,
    steps: Vec<(String, String)>,
}

fn tutorial(readme: &str) -> Tutorial {
    let blocks = fences(readme);
    let serve: Vec<&Fence> = blocks
        .iter()
        .filter(|f| f.info == "sh tutorial-serve")
        .collect();
    assert_eq!(
        serve.len(),
        1,
        "README needs one ```sh tutorial-serve block"
    );
    let command = serve[0].text.split('#').next().unwrap_or_default().trim();
    let serve_args = command
        .strip_prefix("scripts/dev.sh")
        .unwrap_or_else(|| panic!("the tutorial starts with scripts/dev.sh: {command}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut steps = Vec::new();
    let mut iter = blocks.iter().peekable();
    while let Some(fence) = iter.next() {
        if fence.info != "sh tutorial" {
            continue;
        }
        let output = iter
            .next_if(|next| next.info == "text tutorial-output")
            .unwrap_or_else(|| {
                panic!(
                    "tutorial step without a ```text tutorial-output block after it:\n{}",
                    fence.text
                )
            });
        steps.push((fence.text.clone(), output.text.clone()));
    }
    Tutorial { serve_args, steps }
}

/// Whether `line` is the expected line, where `…` stands for any text
/// (leading and trailing blanks aside).
fn line_matches(expected: &str, line: &str) -> bool {
    let parts: Vec<&str> = expected.trim().split('…').collect();
    let Some(mut rest) = line.trim().strip_prefix(parts[0]) else {
        return false;
    };
    if parts.len() == 1 {
        return rest.is_empty();
    }
    let (last, middle) = parts[1..].split_last().unwrap_or((&"", &[]));
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Every non-empty expected line matches an actual line, in order.
fn assert_output_claims(step: &str, expected: &str, actual: &str) {
    let mut lines = actual.lines().map(str::trim_end);
    for want in expected
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
    {
        assert!(
            lines.any(|line| line_matches(want, line)),
            "the README's tutorial claims\n  {want}\nbut its commands\n{step}\nprinted\n{actual}"
        );
    }
}

/// `cmk-proxy dev`, stopped with SIGINT (so it removes its cluster) on drop.
struct Demo {
    child: Child,
    log: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_demo(dir: &Path, args: &[String]) -> Demo {
    let log = dir.join("dev.log");
    let out = fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .arg("dev")
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(args)
        .current_dir(dir)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn cmk-proxy dev");
    let mut demo = Demo { child, log };
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let text = fs::read_to_string(&demo.log).unwrap_or_default();
        if text.contains("the proxy keeps serving") {
            return demo;
        }
        if let Ok(Some(status)) = demo.child.try_wait() {
            panic!("cmk-proxy dev exited ({status}) before serving:\n{text}");
        }
        assert!(Instant::now() < deadline, "demo did not start:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs the steps in one bash (variables carry over), each after a marker
/// line, and returns each step's output (stdout and stderr).
fn run_steps(dir: &Path, steps: &[(String, String)]) -> Vec<String> {
    let marker = |i: usize| format!("@@tutorial step {i}@@");
    let mut script = String::from("exec 2>&1\n");
    for (i, (commands, _)) in steps.iter().enumerate() {
        script.push_str(&format!("echo '{}'\n{commands}", marker(i)));
    }
    fs::write(dir.join("tutorial.sh"), &script).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_cmk-proxy"))
        .parent()
        .unwrap()
        .to_owned();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let mut child = Command::new("bash")
        .arg("tutorial.sh")
        .current_dir(dir)
        .env("PATH", path)
        .env("PSQLRC", "/dev/null")
        .stdout(Stdio::from(
            fs::File::create(dir.join("tutorial.out")).unwrap(),
        ))
        .spawn()
        .expect("run bash");
    let deadline = Instant::now() + HANG_GUARD;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the tutorial's commands hang");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let output = fs::read_to_string(dir.join("tutorial.out")).unwrap();
    let mut parts: Vec<String> = Vec::new();
    for line in output.lines() {
        if line.starts_with(&marker(parts.len())) {
            parts.push(String::new());
        } else if let Some(part) = parts.last_mut() {
            part.push_str(line);
            part.push('\n');
        }
    }
    assert_eq!(parts.len(), steps.len(), "not every step ran:\n{output}");
    parts
}

#[test]
fn readme_tutorial_commands_run_and_print_what_the_readme_claims() {
    require_command("psql", "psql (postgresql-client)");
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let tutorial = tutorial(&readme);
    let claims: String = tutorial.steps.iter().map(|(_, out)| out.as_str()).collect();
    // What the tutorial is for: ciphertext at rest, KM001 after revoking.
    assert!(
        claims.contains("\\x434d4b01"),
        "no ciphertext shown: {claims}"
    );
    assert!(claims.contains("KM001"), "no revocation shown: {claims}");

    let dir = tempfile::tempdir().unwrap();
    let demo = start_demo(dir.path(), &tutorial.serve_args);
    let outputs = run_steps(dir.path(), &tutorial.steps);
    for ((commands, expected), actual) in tutorial.steps.iter().zip(&outputs) {
        assert_output_claims(commands, expected, actual);
    }
    drop(demo);
}

#[test]
fn readme_opens_with_the_two_commands_and_stays_an_entry_page() {
    let readme = fs::read_to_string(repo_root().join("README.md")).unwrap();
    let first = &fences(&readme)[0];
    assert!(
        first.text.contains("scripts/dev.sh") && first.text.contains("scripts/test.sh"),
        "the README's first block must be the two commands: {first:?}"
    );
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines: reference material belongs in docs/"
    );
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo_root().join("README.md")];
    let mut dirs = vec![repo_root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files
}

/// Targets of inline links `[text](target)` outside code blocks.
fn link_targets(markdown: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push(rest[..end].trim().to_owned());
                rest = &rest[end..];
            }
        }
    }
    targets
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces
/// as hyphens.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Anchors of every heading of a Markdown file (outside code blocks).
fn anchors(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence && line.starts_with('#') {
            out.push(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn every_relative_link_in_readme_and_docs_resolves() {
    let mut broken = Vec::new();
    let files = markdown_files();
    assert!(files.len() > 5, "docs/ not found: {files:?}");
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for target in link_targets(&text) {
            if target.starts_with("http://")
                || target.starts_with("https://")
                || target.starts_with("mailto:")
            {
                continue;
            }
            let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            if !resolved.exists() {
                broken.push(format!("{}: {target}", file.display()));
            } else if !fragment.is_empty() {
                let headings = anchors(&fs::read_to_string(&resolved).unwrap_or_default());
                if !headings.iter().any(|a| a == fragment) {
                    broken.push(format!("{}: {target} (no such heading)", file.display()));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to nothing:\n{}",
        broken.join("\n")
    );
}

#[test]
fn configuration_examples_parse_as_policies() {
    let page = fs::read_to_string(repo_root().join("docs/CONFIGURATION.md")).unwrap();
    let examples: Vec<Fence> = fences(&page)
        .into_iter()
        .filter(|f| f.info == "yaml policy")
        .collect();
    assert!(examples.len() >= 2, "no ```yaml policy examples");
    for example in examples {
        if let Err(e) = cmk_proxy::config::parse_policy(&example.text, "docs/CONFIGURATION.md") {
            panic!("{e}\n{}", example.text);
        }
    }
}

/// A `cmk-proxy …` command shown in the docs: a whole command line of a
/// ```` ```sh ```` block, or an inline code span (which may name just a
/// subcommand, without its arguments).
struct Documented {
    command: String,
    inline: bool,
}

fn documented_commands(markdown: &str) -> Vec<Documented> {
    let mut commands = Vec::new();
    for fence in fences(markdown).iter().filter(|f| f.info.starts_with("sh")) {
        for line in fence.text.replace("\\\n", " ").lines() {
            if line.trim_start().starts_with("cmk-proxy ") {
                commands.push(Documented {
                    command: line.trim().to_owned(),
                    inline: false,
                });
            }
        }
    }
    // Code spans may wrap across the lines of a paragraph.
    let mut prose = String::new();
    let mut in_fence = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence {
            prose.push_str(line);
            prose.push(' ');
        }
    }
    for (i, span) in prose.split('`').enumerate() {
        if i % 2 == 1 && span.starts_with("cmk-proxy ") {
            commands.push(Documented {
                command: span.to_owned(),
                inline: true,
            });
        }
    }
    commands
}

/// The arguments of a documented command: shell words up to a comment,
/// optional parts' brackets dropped, `…` placeholders left out.
fn command_words(command: &str) -> Option<Vec<String>> {
    let words = shlex::split(&command.replace(['[', ']'], ""))?;
    Some(
        words
            .into_iter()
            .take_while(|w| !w.starts_with('#') && w != ">" && w != "|")
            .filter(|w| w != "…" && w != "...")
            .collect(),
    )
}

#[test]
fn every_cmk_proxy_command_in_the_docs_parses() {
    use clap::error::ErrorKind;
    use clap::Parser;
    let mut wrong = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let text = fs::read_to_string(&file).unwrap();
        for Documented { command, inline } in documented_commands(&text) {
            let Some(words) = command_words(&command) else {
                wrong.push(format!("{}: {command}: not shell words", file.display()));
                continue;
            };
            checked += 1;
            let Err(e) = cmk_proxy::cli::Cli::try_parse_from(&words) else {
                continue;
            };
            // Prose may name a subcommand alone or with a placeholder value;
            // an unknown subcommand or flag is wrong anywhere.
            let fine = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => true,
                ErrorKind::MissingRequiredArgument
                | ErrorKind::MissingSubcommand
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                | ErrorKind::ValueValidation => inline,
                _ => false,
            };
            if !fine {
                let message = e.to_string();
                let first = message.lines().next().unwrap_or_default();
                wrong.push(format!("{}: {command}: {first}", file.display()));
            }
        }
    }
    assert!(checked > 30, "only {checked} commands found");
    assert!(
        wrong.is_empty(),
        "commands the CLI does not take:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn output_claims_match_with_ellipses_in_order() {
    assert!(line_matches(
        "3 | acme | \\x434d4b01…",
        "  3 | acme | \\x434d4b01ab"
    ));
    assert!(line_matches(
        "ERROR:  KM001: … revoked …",
        "ERROR:  KM001: key of 'acme' is revoked now"
    ));
    assert!(!line_matches(
        "ERROR:  KM001: … revoked",
        "ERROR:  KM002: revoked"
    ));
    assert!(!line_matches("3 | acme", "13 | acme"));
    assert!(!line_matches("3 | acme", "3 | acme | more"));
    assert!(line_matches("3 | acme", "  3 | acme  "));
    assert_eq!(
        anchor(" Audit spool full (KM007)"),
        "audit-spool-full-km007"
    );
    assert_eq!(
        anchor(" Reading a backup without the proxy (`decrypt-dump`)"),
        "reading-a-backup-without-the-proxy-decrypt-dump"
    );
}
