"""The data card of a prepared data set: ``DATA_CARD.md`` written beside its manifest, and the bundled digits' card."""

from omi.protos.dataset import DataCard, DatasetManifest

DIGITS_CARD = DataCard(
    source="UCI ML hand-written digits (Alpaydin & Kaynak 1998), the 1,797 8x8 images bundled with scikit-learn",
    license_terms="CC BY 4.0: training and redistribution allowed with attribution to the UCI repository",
    filtering="none; every image kept, upscaled bilinearly to the model's resolution",
    caption_origin="generated from the label: 'a handwritten digit <word>'",
)


def data_card_markdown(manifest: DatasetManifest) -> str:
    """The human-readable data card written beside the manifest."""
    card = manifest.card
    lines = [f"# Data card: {manifest.name}", "",
             f"- **Source**: {card.source}", f"- **Licence terms**: {card.license_terms}",
             f"- **Filtering**: {card.filtering or 'not stated'}",
             f"- **Captions**: {card.caption_origin or 'not stated'}",
             f"- **Samples**: {manifest.samples:,} in {len(manifest.shards)} shards, for `{manifest.model}` "
             f"({manifest.resolution}x{manifest.resolution}, latents {'x'.join(map(str, manifest.latent_shape))})",
             "", "| licence | samples |", "|---|---|"]
    lines += [f"| {name} | {count:,} |" for name, count in sorted(manifest.licenses.items())]
    if manifest.refused:
        lines += ["", "Refused at preparation:", "", "| reason | samples |", "|---|---|"]
        lines += [f"| {reason} | {count:,} |" for reason, count in sorted(manifest.refused.items())]
    return "\n".join(lines) + "\n"
