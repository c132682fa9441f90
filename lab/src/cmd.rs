//! Running external commands (`ip`, `ping`) with errors that say what failed.

use std::process::{Command, Output};

use anyhow::{anyhow, Context, Result};

/// Renders a command line for messages: program and arguments, space-separated.
pub fn command_line(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs `cmd` to completion and returns its raw output, whatever its exit status.
///
/// Fails only if the program could not be started.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("cannot run `{}`", command_line(cmd)))
}

/// Runs `cmd` and returns its stdout; a non-zero exit becomes an error carrying the
/// command line and the command's stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim();
        let detail = if stderr.is_empty() {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            stderr.to_string()
        };
        return Err(anyhow!(
            "`{}` failed ({}): {}",
            command_line(cmd),
            out.status,
            detail
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` (see [`run`]).
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

/// Runs `ip ARGS...`, ignoring any failure. For teardown paths, which must not fail.
pub fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

/// `ip netns exec NS PROGRAM`: a command that runs `program` inside network namespace `ns`.
/// Add arguments with [`Command::arg`]/[`Command::args`].
pub fn in_ns(ns: &str, program: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, program]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_renders_program_and_args() {
        let cmd = in_ns("vlabcde-na", "ping");
        assert_eq!(command_line(&cmd), "ip netns exec vlabcde-na ping");
    }

    #[test]
    fn failing_command_reports_line_and_stderr() {
        let err =
            run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"])).expect_err("must fail");
        let msg = format!("{err:#}");
        assert!(msg.contains("sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
    }

    #[test]
    fn successful_command_returns_stdout() {
        let out = run(Command::new("sh").args(["-c", "echo hi"])).expect("runs");
        assert_eq!(out, "hi\n");
    }
}
