#!/bin/sh
# The usual `llamafactory-cli train` command line with only `llamafactory-cli train` replaced by
# `snug train` (model and data local: run it from the repository root). --load_best_model_at_end
# becomes output.keep_best: the checkpoint of the lowest eval loss is the final adapter. On a
# machine without a GPU, --fp16 trains with train.precision=auto (fp32) and says so in one line.
snug train --stage sft --do_train --model_name_or_path models/tiny \
  --dataset colours --dataset_dir examples/llamafactory/data --template chatml \
  --finetuning_type lora --output_dir runs/llamafactory-seed --overwrite_cache --overwrite_output_dir \
  --cutoff_len 1024 --preprocessing_num_workers 16 --per_device_train_batch_size 2 \
  --per_device_eval_batch_size 1 --gradient_accumulation_steps 8 --lr_scheduler_type cosine \
  --logging_steps 50 --warmup_steps 20 --save_steps 100 --eval_steps 50 --evaluation_strategy steps \
  --load_best_model_at_end --learning_rate 5e-5 --num_train_epochs 5.0 --max_samples 1000 \
  --val_size 0.1 --plot_loss --fp16 "$@"
