//! `zone-vip`: parse arguments, load the configuration, follow the lease.
//! Exit code 0 after a clean stop, 2 for a configuration error, 1 when the
//! system refuses what is needed (netlink, nftables).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use zone_vip::announce::RawAnnouncer;
use zone_vip::config::Config;
use zone_vip::effects::Systemd;
use zone_vip::neighbours::KernelGate;
use zone_vip::netlink::Netlink;
use zone_vip::rtc::Rtc;
use zone_vip::runner::{self, Effects};
use zone_vip::watchdog::Device;

/// Keeps the zone's floating IP and leader-only services on this server
/// exactly while it holds the leader lease of the local zoned.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Args {
    /// Configuration file (see --print-config).
    #[arg(
        short,
        long,
        default_value = "/etc/zoned/vip.toml",
        env = "ZONE_VIP_CONFIG"
    )]
    config: PathBuf,
    /// Remove the configured VIPs and exit: systemd's ExecStopPost=, the
    /// last line of defence when the agent itself died.
    #[arg(long)]
    remove_all: bool,
    /// Print a commented example configuration and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.print_config {
        print!("{}", Config::example());
        return ExitCode::SUCCESS;
    }
    zone_log::init(None);
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("zone-vip: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("zone-vip: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let netlink = match Netlink::open() {
            Ok(n) => Arc::new(n),
            Err(e) => {
                eprintln!("zone-vip: cannot open netlink: {e}");
                return ExitCode::FAILURE;
            }
        };
        if args.remove_all {
            let mut failed = false;
            for vip in &config.vips {
                if let Err(e) = netlink.remove(vip).await {
                    eprintln!("zone-vip: {e}");
                    failed = true;
                }
            }
            return if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
        // Before any VIP can be held: the kernel answers no ARP for it.
        if let Err(e) = KernelGate::install(&config.vips) {
            eprintln!("zone-vip: {e}");
            return ExitCode::FAILURE;
        }
        let effects = Effects {
            addresses: netlink,
            announcer: Arc::new(RawAnnouncer),
            services: Arc::new(Systemd),
            rtc: Rtc::open(),
            watchdog: Arc::new(Device::new(config.fence.watchdog.clone())),
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("signal handler");
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .expect("signal handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            let _ = stop_tx.send(true);
        });
        runner::run(config, effects, stop_rx).await;
        ExitCode::SUCCESS
    })
}
