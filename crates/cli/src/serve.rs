//! `r3 serve`: flags become an r3-serve config; the model loads here.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use clap::Args;

use crate::{model, DecodeArgs, ModelArgs};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    decode: DecodeArgs,
    /// Address to listen on; anything but localhost exposes the model to
    /// the network
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    /// 0 picks a free port (printed on start)
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every request
    #[arg(long)]
    api_key: Option<String>,
    /// The model's name in /v1/models and requests [default: the model
    /// file's or directory's name]
    #[arg(long)]
    served_model_name: Option<String>,
    /// Most sequences decoded at once across concurrent requests
    #[arg(long, default_value_t = 64)]
    max_rows: usize,
}

pub fn serve(args: ServeArgs) -> Result<()> {
    if args.max_rows == 0 {
        anyhow::bail!("--max-rows must be at least 1");
    }
    let model = model::load(&args.model.sampling_spec(args.decode))?;
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        let source = model.adapter.as_ref().unwrap_or(&model.loaded.path);
        source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "r3".into())
    });
    let config = r3_serve::ServeConfig {
        address: SocketAddr::new(args.host, args.port),
        name: name.clone(),
        api_key: args.api_key,
        max_rows: args.max_rows,
    };
    r3_serve::serve(model, config, |address| {
        // One line on stdout that scripts can wait for.
        println!("serving {name} on http://{address}");
    })
    .context("r3 serve")
}
