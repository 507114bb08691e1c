# avray: `make demo` sets up .venv and runs the main job on generated media; `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo

.PHONY: demo pretrained serve test bench-ingest bench-ingest-720p bench-train bench-serve bench-search clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

CKPT   := checkpoints
# task:frame size of the clips each shipped checkpoint was trained on (their clip settings say so too)
SHIPPED := localization:96 separation:96 captioning:64 retrieval:32 vqa:64 soundnet:64

# Held-out scenes (seed 2; the shipped checkpoints trained on seed 0) -> clip Parquet at each model's
# frame size -> a short training run (the pipeline at work) -> the shipped checkpoints scored on the
# held-out scenes, one line each -> clip embeddings and a search. About 3 minutes on 2 cores.
demo: $(STAMP)
	$(BIN)/avray synth --out $(DEMO)/media --videos 32 --seconds 4 --size 96 --seed 2
	for px in 96 64 32; do \
	  $(BIN)/avray preprocess $(DEMO)/media/manifest.jsonl --out $(DEMO)/data-$${px}px --size $$px --fps 8 || exit 1; done
	rm -rf $(DEMO)/runs $(DEMO)/eval
	$(BIN)/avray train --task localization --data $(DEMO)/data-96px/clips --out $(DEMO)/runs/localization --epochs 3
	for tp in $(SHIPPED); do t=$${tp%%:*}; px=$${tp##*:}; \
	  $(BIN)/avray evaluate --task $$t --checkpoint $(CKPT)/$$t.pt --data $(DEMO)/data-$${px}px/clips --out $(DEMO)/eval/$$t || exit 1; done
	$(BIN)/avray embed --checkpoint $(CKPT)/retrieval.pt --data $(DEMO)/data-32px/clips --out $(DEMO)/emb --overwrite
	$(BIN)/avray search $(DEMO)/emb --text "a red circle on the left hums" -k 3
	@echo
	@echo "The shipped models ($(CKPT)/, how they were trained: $(CKPT)/README.md) on the demo's 32 held-out scenes:"
	@for tp in $(SHIPPED); do $(BIN)/python -c 'import json, sys; r = json.load(open(sys.argv[1])); \
	  print("  %-13s %s\n  %-13s figure: %s" % (r["task"], r["headline"], "", r["figure"]))' $(DEMO)/eval/$${tp%%:*}/metrics.json || exit 1; done
	@echo "A short training run of the pipeline: $(DEMO)/runs/localization (3 epochs on the demo scenes; not served)"
	@echo
	@echo "Serve the shipped models:  make serve   then open http://127.0.0.1:8000/ (the web page), or from another shell:"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 http://127.0.0.1:8000/v1/localize"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 http://127.0.0.1:8000/v1/caption"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 -o speakers.zip http://127.0.0.1:8000/v1/separate"
	@echo "  curl -F text='a red circle on the left hums' http://127.0.0.1:8000/v1/search"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 -F question='what colour is the sounding object?' http://127.0.0.1:8000/v1/ask"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 http://127.0.0.1:8000/v1/classify-sound"

# The shipped checkpoints again, from scratch: 3,000 scenes (seed 0) and the training commands that
# made them, in the quality benchmark's folders (recorded in each checkpoint and in checkpoints/README.md;
# about 100 minutes on 2 cores), then `avray export`. Writes checkpoints/*.pt.
PRE := bench-out/quality
TRAIN_localization := --task localization --data $(PRE)/data-train/clips --out $(PRE)/runs/localization --preset tiny --epochs 4 --batch-size 32 --lr 0.001 --val-fraction 0.1 --use-gpu no --address local --torch-threads 2
TRAIN_separation := --task separation --data $(PRE)/data-train/clips --out $(PRE)/runs/separation-av --preset tiny --epochs 5 --batch-size 8 --lr 0.001 --val-fraction 0.03 --use-gpu no --address local --torch-threads 2
TRAIN_captioning := --task captioning --data $(PRE)/data-train-64px/clips --out $(PRE)/runs/captioning --preset tiny --epochs 18 --batch-size 16 --lr 0.001 --val-fraction 0.03 --use-gpu no --address local --torch-threads 1
TRAIN_retrieval := --task retrieval --data $(PRE)/data-train-32px/clips --out $(PRE)/runs/retrieval --preset tiny --epochs 14 --batch-size 64 --lr 0.001 --val-fraction 0.03 --use-gpu no --address local --torch-threads 2
TRAIN_vqa := --task vqa --data $(PRE)/data-train-64px/clips --out $(PRE)/runs/vqa --preset tiny --epochs 10 --batch-size 32 --lr 0.002 --val-fraction 0.03 --use-gpu no --address local --torch-threads 2
# SoundNet: the visual teacher first (labels on frames), then the audio student distilled from it (no labels)
TRAIN_soundnet_teacher := --task soundnet --data $(PRE)/data-train-64px/clips --out $(PRE)/runs/soundnet-teacher --preset tiny-teacher --epochs 3 --batch-size 32 --lr 0.002 --val-fraction 0.03 --use-gpu no --address local --torch-threads 2
TRAIN_soundnet := --task soundnet --data $(PRE)/data-train-64px/clips --out $(PRE)/runs/soundnet-student --preset tiny --epochs 3 --batch-size 32 --lr 0.002 --val-fraction 0.03 --use-gpu no --address local --torch-threads 2 --teacher-weights $(PRE)/runs/soundnet-teacher/model.pt
pretrained: $(STAMP)
	$(BIN)/avray synth -o $(PRE)/media-train --videos 3000 --seed 0 --seconds 4 --size 96 --max-objects 3
	$(BIN)/avray preprocess $(PRE)/media-train/manifest.jsonl --out $(PRE)/data-train --size 96 --fps 8 --num-cpus 2
	for px in 64 32; do \
	  $(BIN)/avray preprocess $(PRE)/media-train/manifest.jsonl --out $(PRE)/data-train-$${px}px --size $$px --fps 8 --num-cpus 2 || exit 1; done
	$(BIN)/avray train $(TRAIN_localization)
	$(BIN)/avray export $(PRE)/runs/localization/model.pt $(CKPT)/localization.pt --trained-with "avray train $(TRAIN_localization)"
	$(BIN)/avray train $(TRAIN_separation)
	$(BIN)/avray export $(PRE)/runs/separation-av/model.pt $(CKPT)/separation.pt --trained-with "avray train $(TRAIN_separation)"
	$(BIN)/avray train $(TRAIN_captioning)
	$(BIN)/avray export $(PRE)/runs/captioning/model.pt $(CKPT)/captioning.pt --trained-with "avray train $(TRAIN_captioning)"
	$(BIN)/avray train $(TRAIN_retrieval)
	$(BIN)/avray export $(PRE)/runs/retrieval/model.pt $(CKPT)/retrieval.pt --trained-with "avray train $(TRAIN_retrieval)"
	$(BIN)/avray train $(TRAIN_vqa)
	$(BIN)/avray export $(PRE)/runs/vqa/model.pt $(CKPT)/vqa.pt --trained-with "avray train $(TRAIN_vqa)"
	$(BIN)/avray train $(TRAIN_soundnet_teacher)
	$(BIN)/avray train $(TRAIN_soundnet)
	$(BIN)/avray export $(PRE)/runs/soundnet-student/model.pt $(CKPT)/soundnet.pt \
	  --trained-with "avray train $(TRAIN_soundnet_teacher) && avray train $(TRAIN_soundnet)"

serve: $(STAMP)
	$(BIN)/avray serve --localization $(CKPT)/localization.pt --separation $(CKPT)/separation.pt \
	  --captioning $(CKPT)/captioning.pt --retrieval $(CKPT)/retrieval.pt --vqa $(CKPT)/vqa.pt --soundnet $(CKPT)/soundnet.pt \
	  --embeddings $(DEMO)/emb --examples $(DEMO)/media

test: $(STAMP)
	$(BIN)/python -m pytest

bench-ingest: $(STAMP)
	$(BIN)/python benchmarks/ingest.py --runs 3 --write BENCHMARKS.md

bench-ingest-720p: $(STAMP)  # needs the ffmpeg CLI (apt-get install ffmpeg)
	$(BIN)/python benchmarks/ingest.py --set 720p60 --runs 3 --write BENCHMARKS.md

bench-train: $(STAMP)
	$(BIN)/python benchmarks/train.py --runs 3 --write BENCHMARKS.md

bench-serve: $(STAMP)
	$(BIN)/python benchmarks/serve.py --write BENCHMARKS.md

bench-search: $(STAMP)
	$(BIN)/python benchmarks/search.py --write BENCHMARKS.md

clean:
	rm -rf $(DEMO) .pytest_cache
