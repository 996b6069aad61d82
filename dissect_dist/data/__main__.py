"""python -m dissect_dist.data COMMAND ...

    manifest URLS... --out manifest.json [--from tar|stats]
        Build the manifest (shard -> sample count) from tar headers or img2dataset's
        *_stats.json. URLS may be paths, fsspec URLs, or brace patterns as webdataset
        takes them ("s3://b/shards/{00000..00999}.tar", "{train,extra}/{000..009}.tar").
    fashion-mnist --out DIR --noise 0.4 [--subset N] [--seed S]
    icons --out DIR --noise 0.4 [--heldout 0.1] [--seed S]
    folder --images DIR --captions FILE.csv|.tsv --out DIR [--img-key filepath --caption-key title]
    photos --out DIR --samples N [--seed S]
        Web-like JPEG/caption pairs from scikit-image's bundled photographs (benchmarks).
"""

from __future__ import annotations

import argparse
import json
import sys

from dissect_dist.cli import Parser, fail
from dissect_dist.data import builders
from dissect_dist.data.manifest import Manifest, ManifestError, expand_urls
from dissect_dist.data.photos import build_photos


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m dissect_dist.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifest", help="shard URL -> sample count, for dense sample ids")
    m.add_argument("urls", nargs="+",
                   help="shard paths or fsspec URLs; brace lists and ranges are expanded "
                        "('s3://b/{train,extra}-{00000..00999}.tar')")
    m.add_argument("--out", required=True, help="the manifest JSON to write")
    m.add_argument("--from", dest="source", choices=["tar", "stats"], default="tar",
                   help="count samples from the tar headers, or read img2dataset's "
                        "*_stats.json beside each shard (default: tar)")
    f = sub.add_parser("fashion-mnist", help="Fashion-MNIST image-caption pairs with "
                       "planted noisy captions (train/, test/, classes.json)")
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument("--noise", type=float, default=0.4,
                   help="fraction of training pairs given another class's caption, "
                        "recorded in train/noise_ledger.npy (default: 0.4)")
    f.add_argument("--subset", type=int, default=None,
                   help="use this many training images, drawn at random (default: all 60000)")
    f.add_argument("--seed", type=int, default=0,
                   help="seed of the subset, the noise and the captions (default: 0)")
    f.add_argument("--shard-size", type=int, default=1000,
                   help="samples per tar shard (default: 1000)")
    f.add_argument("--source", default=builders.FASHION_MNIST_DIR,
                   help="directory holding the *-idx?-ubyte.gz files "
                        f"(default: {builders.FASHION_MNIST_DIR})")
    i = sub.add_parser("icons", help="icon glyphs captioned with their names, planted noisy "
                       "captions and a held-out split (train/, heldout/)")
    i.add_argument("--out", required=True, help="output directory")
    i.add_argument("--noise", type=float, default=0.4,
                   help="fraction of training pairs given another icon's caption, recorded "
                        "in train/noise_ledger.npy (default: 0.4)")
    i.add_argument("--heldout", type=float, default=0.1,
                   help="fraction of the icons held out for retrieval evaluation "
                        "(default: 0.1)")
    i.add_argument("--seed", type=int, default=0,
                   help="seed of the split, the noise and the captions (default: 0)")
    i.add_argument("--size", type=int, default=32, help="icon image side in pixels "
                   "(default: 32)")
    i.add_argument("--shard-size", type=int, default=1000,
                   help="samples per tar shard (default: 1000)")
    d = sub.add_parser("folder", help="WebDataset shards from a folder of images and a "
                       "CSV/TSV of captions")
    d.add_argument("--images", required=True,
                   help="directory the caption file's relative image paths start from")
    d.add_argument("--captions", required=True,
                   help="CSV or TSV (.tsv/.tab) with an image path and a caption column")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--sep", default=None,
                   help="column separator (default: tab for .tsv/.tab, else comma)")
    d.add_argument("--img-key", default="filepath",
                   help="the image path column (default: filepath)")
    d.add_argument("--caption-key", default="title",
                   help="the caption column (default: title)")
    d.add_argument("--shard-size", type=int, default=1000,
                   help="samples per tar shard (default: 1000)")
    ph = sub.add_parser("photos", help="web-like JPEG/caption pairs for loader benchmarks")
    ph.add_argument("--out", required=True, help="output directory (shards + manifest.json)")
    ph.add_argument("--samples", type=int, required=True, help="number of pairs to write")
    ph.add_argument("--seed", type=int, default=0, help="seed of crops, sizes and captions")
    ph.add_argument("--shard-size", type=int, default=1000, help="samples per tar shard")
    a = p.parse_args(argv)
    try:
        if a.cmd == "manifest":
            urls = [u for spec in a.urls for u in expand_urls(spec)]
            man = (Manifest.from_tars(urls, progress=True) if a.source == "tar"
                   else Manifest.from_stats(urls))
            man.save(a.out)
            res = {"shards": len(man.urls), "samples": man.total, "out": a.out}
        elif a.cmd == "fashion-mnist":
            res = builders.build_fashion_mnist(a.out, noise=a.noise, seed=a.seed,
                                               subset=a.subset, shard_size=a.shard_size,
                                               source=a.source)
        elif a.cmd == "icons":
            res = builders.build_icons(a.out, noise=a.noise, seed=a.seed, heldout=a.heldout,
                                       size=a.size, shard_size=a.shard_size)
        elif a.cmd == "photos":
            res = build_photos(a.out, samples=a.samples, seed=a.seed, shard_size=a.shard_size)
        else:
            res = builders.build_from_folder(a.out, images=a.images, captions=a.captions,
                                             sep=a.sep, img_key=a.img_key,
                                             caption_key=a.caption_key,
                                             shard_size=a.shard_size)
    except (ManifestError, FileNotFoundError, ValueError) as e:
        return fail(p.prog, str(e))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
