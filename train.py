from dbrx_train.train import main

main()
