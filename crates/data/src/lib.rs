//! Datasets for τ-ResNet experiments: MNIST, CIFAR-10/100, image folders and synthetic data.
