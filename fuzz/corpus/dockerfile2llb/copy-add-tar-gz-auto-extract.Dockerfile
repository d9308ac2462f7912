FROM scratch
ADD files.tar.gz /x/
