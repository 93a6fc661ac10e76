//! `quetzal image build|import|list|rm`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use hyper::Method;
use quetzal_image::import::FirmwareChoice;
use quetzal_image::{BuildOutcome, DEFAULT_IMAGE, Firmware, ImageError, ImageStore};

use crate::client::{Client, encode};
use crate::{Output, data_dir};

/// `--firmware`.
#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum FirmwareArg {
    /// From the disk: BIOS boot code, else an EFI system partition.
    #[default]
    Auto,
    Bios,
    Uefi,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build a guest image from Debian packages (cached: a second run says
    /// it is up to date).
    Build {
        /// The image to build.
        #[arg(default_value = DEFAULT_IMAGE)]
        name: String,
    },
    /// Import a disk image with its own bootloader (a qcow2 or raw cloud
    /// image, such as Debian's or Ubuntu's): checked, stored read-only,
    /// its VMs booting from it with a cloud-init seed.
    Import {
        /// 1-63 of a-z, 0-9 and '-'.
        name: String,
        file: PathBuf,
        /// The firmware its bootloader needs.
        #[arg(long, value_enum, default_value_t)]
        firmware: FirmwareArg,
        /// Its cloud-init default user (what --ssh-key authorizes), for
        /// `vm show` to name: `debian` for Debian's, `ubuntu` for Ubuntu's.
        #[arg(long)]
        user: Option<String>,
    },
    /// Remove an image; refused while a VM or template uses it (asks the
    /// running quetzald, which knows them).
    Rm { name: String },
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
        ImageCommand::Import {
            name,
            file,
            firmware,
            user,
        } => {
            let firmware = match firmware {
                FirmwareArg::Auto => FirmwareChoice::Detect,
                FirmwareArg::Bios => FirmwareChoice::Given(Firmware::Bios),
                FirmwareArg::Uefi => FirmwareChoice::Given(Firmware::Uefi),
            };
            let image = store.import(&name, &file, firmware, user, &mut |line| {
                eprintln!("quetzal: {line}")
            })?;
            eprintln!(
                "quetzal: {name} is ready ({} firmware) in {}",
                image.manifest.firmware.as_str(),
                image.dir.display()
            );
        }
        ImageCommand::Rm { name } => {
            crate::block_on(async {
                Client::from_env()
                    .call(
                        Method::DELETE,
                        &format!("/api/v1/images/{}", encode(&name)),
                        None,
                    )
                    .await
                    .map_err(anyhow::Error::from)
            })?;
            eprintln!("quetzal: image {name} removed");
        }
        ImageCommand::List { output } => {
            let mut rows = Vec::new();
            let names = store.names()?;
            for name in &names {
                let built = match store.get(name) {
                    Ok(image) => Some(image),
                    Err(ImageError::NotBuilt { .. }) => None,
                    Err(err) => return Err(err.into()),
                };
                rows.push((name.as_str(), built));
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
                    println!("{:<12} {:<6} {:<6} BUILD", "NAME", "BUILT", "BOOT");
                    for (name, image) in rows {
                        let id = image.as_ref().map_or("-", |i| i.manifest.id.as_str());
                        let built = if image.is_some() { "yes" } else { "no" };
                        let boot = image.as_ref().map_or("-", |i| match i.manifest.boot {
                            quetzal_image::BootFrom::Kernel => "kernel",
                            quetzal_image::BootFrom::Disk => i.manifest.firmware.as_str(),
                        });
                        println!("{name:<12} {built:<6} {boot:<6} {id}");
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
