"""``python -m cogrpo_lightning {fit,validate,test,predict} --config FILE``."""

from cogrpo_lightning.cli import main

if __name__ == "__main__":
    main()
