//! devctl: the command line for devmgrd. It talks to the daemon only through
//! the `proto` contract; see `devctl --help` for the commands and exit codes.

/// Writes a line to stdout, returning early on failure (see `output`).
macro_rules! outln {
    ($($arg:tt)*) => { $crate::output::write_line(&format!($($arg)*))? };
}

/// Writes to stdout, returning early on failure (see `output`).
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write_str(&format!($($arg)*))? };
}

mod act;
mod cli;
mod connect;
mod failure;
mod hold;
mod model;
mod monitor;
mod output;
mod query;
mod render;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use cli::{Cli, Command};
use failure::{Failure, Outcome};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code),
        Err(Failure::OutputClosed) => ExitCode::from(Failure::OutputClosed.exit_code()),
        Err(failure) => {
            eprintln!("devctl: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}

async fn run(cli: Cli) -> Outcome<u8> {
    // The commands that need no daemon.
    match &cli.command {
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "devctl", &mut out);
            out!("{}", String::from_utf8_lossy(&out));
            return Ok(0);
        }
        Command::Manpage => {
            let mut out = Vec::new();
            clap_mangen::Man::new(Cli::command())
                .render(&mut out)
                .map_err(|e| Failure::Failed(format!("cannot render the man page: {e}")))?;
            out!("{}", String::from_utf8_lossy(&out));
            return Ok(0);
        }
        _ => {}
    }
    let found = connect::find(cli.address.as_deref()).await?;
    let conn = &found.conn;
    let json = cli.json;
    match cli.command {
        Command::Status => query::status(&found, json).await?,
        Command::List => query::list(conn, json).await?,
        Command::Tree => query::tree(conn, json).await?,
        Command::Show { obj } => query::show(conn, &obj, json).await?,
        Command::Add(what) => act::add(conn, what, json).await?,
        Command::Remove(args) => act::remove(conn, args, json).await?,
        Command::Stop { obj } => act::simple(conn, &obj, act::Simple::Stop, json).await?,
        Command::Reenable { obj } => act::simple(conn, &obj, act::Simple::Reenable, json).await?,
        Command::Bind { obj, driver } => {
            act::simple(conn, &obj, act::Simple::Bind(driver), json).await?
        }
        Command::Unbind { obj } => act::simple(conn, &obj, act::Simple::Unbind, json).await?,
        Command::Hold(args) => return hold::hold(conn, args).await,
        Command::Monitor(args) => monitor::monitor(conn, args, json).await?,
        Command::Completions { .. } | Command::Manpage => {}
    }
    Ok(0)
}
