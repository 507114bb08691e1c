# avray: `make demo` sets up .venv and runs the main job on generated media; `make test` runs the suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= demo

.PHONY: demo serve test bench-ingest bench-ingest-720p bench-train bench-serve bench-search clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Scenes -> clip Parquet -> four tiny models (a few minutes on 2 cores) -> clip embeddings -> how to serve them.
demo: $(STAMP)
	$(BIN)/avray synth --out $(DEMO)/media --videos 24 --seconds 4 --size 128 --seed 0
	$(BIN)/avray preprocess $(DEMO)/media/manifest.jsonl --out $(DEMO)/data --size 96 --fps 8
	rm -rf $(DEMO)/runs
	for task in localization separation captioning retrieval; do \
	  $(BIN)/avray train --task $$task --data $(DEMO)/data/clips --out $(DEMO)/runs/$$task --epochs 3 || exit 1; done
	$(BIN)/avray embed --checkpoint $(DEMO)/runs/retrieval/model.pt --data $(DEMO)/data/clips --out $(DEMO)/emb --overwrite
	$(BIN)/avray search $(DEMO)/emb --text "a red circle on the left hums" -k 3
	@echo
	@echo "Serve the demo models:  make serve   (= avray serve with the four checkpoints in $(DEMO)/runs and $(DEMO)/emb)"
	@echo "then, from another shell:"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 http://127.0.0.1:8000/v1/localize"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 http://127.0.0.1:8000/v1/caption"
	@echo "  curl -F file=@$(DEMO)/media/scene_00000.mp4 -o speakers.zip http://127.0.0.1:8000/v1/separate"
	@echo "  curl -F text='a red circle on the left hums' http://127.0.0.1:8000/v1/search"

serve: $(STAMP)
	$(BIN)/avray serve --localization $(DEMO)/runs/localization/model.pt \
	  --separation $(DEMO)/runs/separation/model.pt --captioning $(DEMO)/runs/captioning/model.pt \
	  --retrieval $(DEMO)/runs/retrieval/model.pt --embeddings $(DEMO)/emb --examples $(DEMO)/media

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
