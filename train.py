from dbrx_train.training.train import main

main()
