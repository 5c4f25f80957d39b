//! `skyline ca init` and `skyline ca issue`: the mesh CA on the command line (see
//! [`crate::tls::ca`]).

use std::io::Write;
use std::path::PathBuf;

use crate::tls::ca::{self, CaError, Kind, LeafSpec};

/// The mesh CA: create it, issue proxy certificates with it.
#[derive(clap::Args, Clone, Debug)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(clap::Subcommand, Clone, Debug)]
pub enum CaCommand {
    /// Create a mesh CA in DIR: ca.crt (give it to every proxy as tls.ca) and ca.key (mode
    /// 0600, keep it on this machine). Refuses to overwrite an existing CA.
    Init {
        /// The CA's folder (created if missing)
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,

        /// The SPIFFE trust domain of the mesh's identities
        #[arg(long, value_name = "DOMAIN", default_value = ca::DEFAULT_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Issue a short-lived certificate for a proxy, with the SPIFFE ID
    /// spiffe://<trust-domain>/<kind>/<name>: writes OUT.crt and OUT.key (mode 0600), each
    /// replaced whole, so a running proxy picks them up at its next reload.
    Issue {
        /// The CA's folder
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,

        /// What the certificate is for
        #[arg(long, value_enum)]
        kind: Kind,

        /// The proxy's name: the node's name, or the gateway's or bridge's
        #[arg(long, value_name = "NAME")]
        name: String,

        /// How long the certificate is valid, such as 24h or 30m
        #[arg(long, value_name = "DURATION", default_value = "24h")]
        ttl: String,

        /// Where to write: OUT.crt and OUT.key
        #[arg(long, value_name = "OUT")]
        out: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CaCliError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("--ttl: {0}")]
    Ttl(String),
    #[error("cannot write the output")]
    Output(#[from] std::io::Error),
}

/// Runs `skyline ca ...`, printing what it wrote to `out`.
pub fn run(args: CaArgs, out: &mut impl Write) -> Result<(), CaCliError> {
    match args.command {
        CaCommand::Init { dir, trust_domain } => {
            let made = ca::init(&dir, &trust_domain)?;
            writeln!(
                out,
                "created the mesh CA of spiffe://{} in {} ({} and {}, the key mode 0600)",
                made.trust_domain,
                dir.display(),
                ca::CA_CERT,
                ca::CA_KEY
            )?;
        }
        CaCommand::Issue {
            dir,
            kind,
            name,
            ttl,
            out: path,
        } => {
            let ttl = crate::config::parse_duration_setting(&ttl).map_err(CaCliError::Ttl)?;
            if ttl.is_zero() {
                return Err(CaCliError::Ttl("must be longer than 0s".into()));
            }
            let authority = ca::load(&dir)?;
            let leaf = ca::issue(&authority, &LeafSpec::for_ttl(kind, &name, ttl))?;
            let (cert, key) = ca::write_leaf(&leaf, &path)?;
            writeln!(
                out,
                "issued {} (serial {}, valid {}s): {} and {}",
                leaf.id,
                leaf.serial,
                ttl.as_secs(),
                cert.display(),
                key.display()
            )?;
        }
    }
    Ok(())
}
