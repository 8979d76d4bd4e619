"""The `histo` command: a click group whose subcommands are imported only when they are run.

This is the composition root: `histo/` never imports the domain packages elsewhere, and each
subcommand imports them inside its function so `histo --help` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import shlex
import sys
from pathlib import Path

import click

from histo import __version__
from histo.batch import BatchStopped
from histo.errors import HistoError
from histo.log import close_logging, setup_logging

logger = logging.getLogger(__name__)
STOPPED = 3  # exit code of a batch stopped by its environment (disk full, output not writable)

# name -> "module:attribute" of the click command; imported on first use.
COMMANDS = {
    "tile": "histo.cli.tile:tile",
    "train": "histo.cli.train:train",
    "index": "histo.cli.index:index",
    "search": "histo.cli.search:search",
    "segment": "histo.cli.segment:segment",
    "robustness": "histo.cli.robustness:robustness",
    "serve": "histo.cli.serve:serve",
    "export": "histo.cli.export:export",
    "features": "histo.cli.features:features",
    "encoders": "histo.cli.encoders:encoders",
}

HELP = {
    "tile": "Tile slides with the high-cellularity mosaic into a zarr tile store.",
    "train": "Train or fine-tune a KimiaNet (DenseNet-121) feature extractor on weak slide labels.",
    "index": "Extract features of a tile store and build a FAISS slide index.",
    "search": "Search an index with query slides or image patches.",
    "segment": "Train, apply and evaluate reversible-MBConv 3D U-Nets on BraTS MRI.",
    "robustness": "Evaluate models under image corruptions (ImageNet-C style metrics).",
    "serve": "Serve a search page (archive, queries, matched tiles, slide viewer) and its JSON API.",
    "export": "Write a tile store's tiles as CLAM/TRIDENT coordinates or QuPath GeoJSON.",
    "features": "Write per-slide CLAM/TRIDENT feature files (.h5, optionally .pt) of a tile store.",
    "encoders": "List the feature encoders (KimiaNet, UNI, Virchow2, ...) and what defines their features.",
}


class LazyGroup(click.Group):
    """A group that lists commands from a table and imports a command module only when it runs."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Use the static help table so `histo --help` imports no command module.
        with formatter.section("Commands"):
            formatter.write_dl([(name, HELP[name]) for name in COMMANDS])

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BatchStopped as e:  # the environment ended a batch: what finished, then the reason
            from histo.cli.options import JSON_META
            from histo.cli.outcomes import report_stopped

            report_stopped(e, ctx.meta.get(JSON_META, False))
            logger.error("%s", e, exc_info=True)
            sys.exit(STOPPED)
        except HistoError as e:  # a user mistake: one line on the terminal, the traceback in --log-file
            logger.error("%s", e, exc_info=True)
            sys.exit(2)
        except Exception:  # a bug: Python prints the traceback; --log-file keeps it too
            logger.debug("uncaught exception", exc_info=True)
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="histo")
@click.option("-v", "--verbose", is_flag=True, help="Show debug messages (and tracebacks of failed items).")
@click.option("-q", "--quiet", is_flag=True, help="Show only warnings and errors.")
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False),
    help="Append every message, from debug up, with timestamps and tracebacks, to this file.",
)
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, log_file: str | None) -> None:
    """histo: slide retrieval (tile, train, index, search) and brain-tumour segmentation (segment)."""
    if verbose and quiet:
        raise click.UsageError("--verbose and --quiet exclude each other")
    ctx.call_on_close(close_logging)
    setup_logging(1 if verbose else -1 if quiet else 0, log_file)
    logger.debug("histo %s in %s: %s", __version__, Path.cwd(), shlex.join(sys.argv))
