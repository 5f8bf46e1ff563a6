//! lb-forwarder — farms (virtual services), backends, schedulers, health
//! checks and the nftables kernel datapath that serves them.

mod api;

use std::process::ExitCode;

use clap::Parser;
use lb_forwarder::datapath::{self, Datapath};
use lb_forwarder::health::HealthMonitor;
use tandem_proto::v1::lb_forwarder_server::LbForwarderServer;
use tandem_runtime::{ConfigCell, DaemonArgs};
use tonic::transport::Server;

/// Tandem's load balancer: serves the farms through the kernel's nftables datapath.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tandem_runtime::run("lb-forwarder", args.daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let dp = Datapath::new();
        let mut stop = ctx.shutdown();
        let mut monitor =
            HealthMonitor::start(
                &config.current().config.farms,
                async move { stop.wait().await },
            );
        let failing = monitor.failing();
        let health = monitor.watch();
        // The counters, read once a second (rates, metrics).
        let sampler = lb_forwarder::rates::Sampler::new();
        tokio::spawn(lb_forwarder::rates::run(sampler.clone(), ctx.shutdown()));
        let scrape = lb_forwarder::metrics::LbMetrics::new(
            config.clone(),
            dp.clone(),
            monitor.watch(),
            sampler.clone(),
        );
        tandem_runtime::metrics::spawn(
            ctx.daemon,
            &config,
            std::sync::Arc::new(scrape),
            ctx.shutdown(),
        );
        let events = monitor.subscribe();
        // Health checks follow the configuration in force.
        let mut configs = config.subscribe();
        let mut stop = ctx.shutdown();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = configs.changed() => {
                        if r.is_err() { break; }
                        let farms = configs.borrow_and_update().config.farms.clone();
                        monitor.reconfigure(&farms);
                    }
                    () = stop.wait() => break,
                }
            }
        });
        let datapath = tokio::spawn(datapath::run(
            config.clone(),
            dp.clone(),
            failing,
            ctx.shutdown(),
        ));
        let api = api::LbForwarderApi {
            config,
            datapath: dp,
            health,
            events,
            sampler,
            shutdown: ctx.shutdown(),
        };
        let served = ctx
            .serve(Server::builder().add_service(LbForwarderServer::new(api)))
            .await;
        ctx.trigger_shutdown();
        datapath.await?;
        served
    })
}
