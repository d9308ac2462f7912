FROM busybox
WORKDIR /app
COPY dir/missing.txt ./
