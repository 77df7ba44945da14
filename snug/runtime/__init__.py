"""What a snug process does around the work, for every layer above snug/core/: files written
aside and renamed into place, with free space checked (files.py); a lock on a folder that
names its holder (lockfile.py); a long phase told as counts with an ETA (progress.py); ending
a process without tearing the interpreter down (shutdown.py); whether the Hugging Face hub
answers (hub.py). Each imports nothing of snug's but snug.errors."""
