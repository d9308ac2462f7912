FROM scratch
ADD {{GIT_HTTP}}/repo.git#main:sub /r
