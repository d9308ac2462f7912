FROM scratch
ADD missing.tar /
