FROM scratch
COPY --parents ./dir/./sub/two /p/
