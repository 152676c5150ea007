"""Write a checkpoint of this project as a transformers BERT folder (or copy such a folder).

    python convert.py full_mlm_model.pt OUT_DIR   # -> BertForMaskedLM
    python convert.py ns_model.pt OUT_DIR         # -> BertForNextSentencePrediction
    python convert.py ns_bert.pt OUT_DIR          # -> BertModel (with ns_task.py's pooler)
    python convert.py mlm_bert.pt OUT_DIR         # -> BertModel (no pooler)
    python convert.py qa_model.pt OUT_DIR         # -> BertForQuestionAnswering
    python convert.py glue_model.pt OUT_DIR       # -> BertForSequenceClassification

The weight names and the folder's files: transformers_format.py.
"""

import argparse
import sys

from bertkit import checkpoint, checks
from bertkit.files import UserError
from bertkit.transformers_format import export


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write a checkpoint of this project (or a transformers BERT folder) as a "
                    "folder transformers loads: config.json, model.safetensors, tokenizer files")
    parser.add_argument("checkpoint", help="full_mlm_model.pt, ns_model.pt, qa_model.pt, "
                                           "glue_model.pt, mlm_bert.pt, ns_bert.pt, or a "
                                           "transformers folder")
    parser.add_argument("out_dir", help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT_DIR when it exists and is not empty (default: refuse)")
    args = parser.parse_args(argv)
    try:
        ckpt = checkpoint.load_checkpoint(args.checkpoint, "CHECKPOINT")
        checkpoint.refuse_state_file(ckpt, "CHECKPOINT", args.checkpoint)
        # OUT_DIR is written whole (--force: replaced whole): it may hold no input.
        checks.check_folder_output("OUT_DIR", args.out_dir, {"CHECKPOINT": args.checkpoint})
        lock = checks.OutputLock([args.out_dir])  # another convert.py into it refuses
        try:
            lines = export(ckpt, args.out_dir, args.force, source=args.checkpoint)
        finally:
            lock.release()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
