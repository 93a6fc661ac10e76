//! `quetzal image build|list`.

use std::process::ExitCode;

use clap::Subcommand;
use quetzal_image::{BuildOutcome, DEFAULT_IMAGE, IMAGES, ImageError, ImageStore};

use crate::{Output, data_dir};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a guest image from Debian packages (cached: a second run says
    /// it is up to date).
    Build {
        /// The image to build.
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
    },
    /// The known images and whether they are built.
    List {
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
}

pub fn run(command: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = ImageStore::new(&data_dir());
    match command {
        ImageCommand::Build { name } => {
            let outcome = store.build(&name, &mut |line| eprintln!("quetzal: {line}"))?;
            if outcome == BuildOutcome::Built {
                let image = store.get(&name)?;
                eprintln!("quetzal: {} is ready in {}", name, image.dir.display());
            }
        }
        ImageCommand::List { output } => {
            let mut rows = Vec::new();
            for name in IMAGES {
                let built = match store.get(name) {
                    Ok(image) => Some(image),
                    Err(ImageError::NotBuilt { .. }) => None,
                    Err(err) => return Err(err.into()),
                };
                rows.push((*name, built));
            }
            match output {
                Output::Json => {
                    let json: Vec<_> = rows
                        .iter()
                        .map(|(name, image)| {
                            serde_json::json!({
                                "name": name,
                                "built": image.is_some(),
                                "manifest": image.as_ref().map(|i| &i.manifest),
                            })
                        })
                        .collect();
                    println!("{}", serde_json::to_string_pretty(&json)?);
                }
                Output::Human => {
                    println!("{:<8} {:<6} BUILD", "NAME", "BUILT");
                    for (name, image) in rows {
                        let id = image.as_ref().map_or("-", |i| i.manifest.id.as_str());
                        let built = if image.is_some() { "yes" } else { "no" };
                        println!("{name:<8} {built:<6} {id}");
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
