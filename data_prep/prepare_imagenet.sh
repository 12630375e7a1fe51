#!/usr/bin/env bash
# Turn the ILSVRC2012 release archives into DEST/train/<wnid>/, DEST/val/<wnid>/ and DALI file lists.
#
#   make prepare-imagenet SRC=/archives DEST=/data/imagenet
#   bash data_prep/prepare_imagenet.sh SRC DEST
#
# SRC     folder holding ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar, ILSVRC2012_devkit_t12.tar.gz
#         (only ever read; ILSVRC2012_img_test.tar, if there, is ignored)
# DEST    output folder (created); interrupted runs continue where they stopped, finished classes
#         are not redone, and a run on a finished DEST is a quick no-op
# PYTHON  interpreter with this package installed (default: python3)
# WORKERS parallel extraction processes (default: all cores)
# VERIFY  counts (default: per-class counts against the devkit) | decode (also decode every image)
set -euo pipefail

SRC=${1:-}
DEST=${2:-}
PYTHON=${PYTHON:-python3}
WORKERS=${WORKERS:-$(nproc)}
VERIFY=${VERIFY:-counts}
TRAIN_TAR=ILSVRC2012_img_train.tar
VAL_TAR=ILSVRC2012_img_val.tar
DEVKIT=ILSVRC2012_devkit_t12.tar.gz

die() { echo "error: $*" >&2; exit 2; }

[[ -n $SRC && -n $DEST ]] || die "usage: make prepare-imagenet SRC=<folder with $TRAIN_TAR, $VAL_TAR, $DEVKIT> DEST=<output folder>"
[[ -d $SRC ]] || die "SRC=$SRC: not a folder"
for name in "$TRAIN_TAR" "$VAL_TAR" "$DEVKIT"; do
  [[ -f $SRC/$name ]] || die "$SRC/$name: missing (download it from image-net.org into SRC)"
  [[ -r $SRC/$name ]] || die "$SRC/$name: not readable"
done
[[ ! -e $DEST || -d $DEST ]] || die "DEST=$DEST: exists and is not a folder"
[[ $VERIFY == counts || $VERIFY == decode ]] || die "VERIFY=$VERIFY: expected counts or decode"
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || die "WORKERS=$WORKERS: expected a positive number"

if "$PYTHON" -m data_prep.finish --check-up-to-date --src "$SRC" --dest "$DEST"; then
  echo "$DEST is already prepared from these archives (remove $DEST/COMPLETE to redo the checks)"
  exit 0
fi
mkdir -p "$DEST" 2>/dev/null || die "DEST=$DEST: cannot create the folder"
[[ -w $DEST ]] || die "DEST=$DEST: not writable (read-only filesystem or no permission)"
rm -f "$DEST/COMPLETE"  # from here until the end, DEST is not complete
trap 'echo "interrupted: $DEST is incomplete; run the same command again to continue" >&2; exit 130' INT

step() { echo "== $*"; }
step "1/4 devkit: classes and val labels"
"$PYTHON" -m data_prep.devkit --devkit "$SRC/$DEVKIT" --dest "$DEST"
step "2/4 train: $TRAIN_TAR"
"$PYTHON" -m data_prep.extract --split train --archive "$SRC/$TRAIN_TAR" --dest "$DEST" --workers "$WORKERS"
step "3/4 val: $VAL_TAR"
"$PYTHON" -m data_prep.extract --split val --archive "$SRC/$VAL_TAR" --dest "$DEST" --workers "$WORKERS"
step "4/4 file lists, verification ($VERIFY), manifest"
"$PYTHON" -m data_prep.finish --src "$SRC" --dest "$DEST" --workers "$WORKERS" $([[ $VERIFY == decode ]] && echo --decode)
rm -rf "$DEST/.partial"
echo "done: $DEST (train.txt, val.txt, synsets.txt, manifest.json, COMPLETE)"
